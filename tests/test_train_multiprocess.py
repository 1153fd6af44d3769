"""Two processes on localhost (jax.distributed, 2 fake CPU devices each, gloo collectives) train through
the real command line, match the single-process losses, and save then restore one checkpoint together.

The single-process reference reads exactly the global batches the two processes assemble: process 0's
shard rows first, then process 1's (each process's devices hold its own rows).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dediffusion_jax.t2i import folder
from dediffusion_jax.train import cli, loop

from test_train_loop import REPO, TINY, losses_of, write_decoder

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 6
SETTINGS = {**TINY, "total_steps": STEPS, "checkpoint.every_steps": 3, "log.samples_every": 3}


class TwoHostData:
    """The global batches of a 2-process run, built in one process (process 0 rows, then process 1)."""

    def __init__(self, config, decoder):
        self.shards = [loop.make_data(config, decoder, process_index=i, process_count=2) for i in (0, 1)]

    def __iter__(self):
        return _TwoHostIterator([iter(s) for s in self.shards])


class _TwoHostIterator:
    def __init__(self, iterators):
        self.iterators = iterators

    def __next__(self):
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    @property
    def num_skipped(self) -> int:
        return sum(it.num_skipped for it in self.iterators)

    def get_state(self) -> bytes:  # grain's checkpoint handler: bytes for non-grain iterators
        return json.dumps([it.get_state() for it in self.iterators]).encode()

    def set_state(self, state: bytes) -> None:
        for it, s in zip(self.iterators, json.loads(state)):
            it.set_state(s)

    def start_prefetch(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir: Path, decoder_dir: Path, expect_ok: bool = True) -> list[str]:
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DEDIFFUSION_JAX_CACHE": "off",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "dediffusion_jax.train",
               "--config", f"projects/miniworld/configs/world.py:decoder={decoder_dir},eval_every=0", "--workdir", str(workdir),
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
        cmd += [f"--config.{k}={v}" for k, v in SETTINGS.items()]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=480)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert (p.returncode == 0) == expect_ok, out[-5000:]
    return outputs


def test_two_processes_match_one_and_share_a_checkpoint(tmp_path):
    decoder_dir = write_decoder(tmp_path / "decoder", seed=0)
    config = cli.load_config_file(f"{REPO}/projects/miniworld/configs/world.py:decoder={decoder_dir},eval_every=0")
    config.update_from_flattened_dict(SETTINGS)
    decoder = folder.load_decoder(decoder_dir)
    reference = tmp_path / "single"
    loop.train_and_evaluate(config, reference, decoder=decoder, dataset=TwoHostData(config, decoder))
    want = losses_of(reference)

    workdir = tmp_path / "two"
    outputs = run_two_processes(workdir, decoder_dir)
    assert "process 1 of 2" in outputs[1] or "process 1 of 2" in outputs[0]
    got = losses_of(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    # atol too: the world's objective (mean log MSE + diversity term) can pass through zero, where a
    # relative tolerance alone would demand more than float32 gives (a loss of 0.0028 differed by 4e-8).
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                               [want[s] for s in range(1, STEPS + 1)], rtol=1e-5, atol=1e-6)
    step3 = workdir / "checkpoints" / "3"
    assert sorted(p.name for p in (step3 / "data").glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]

    # Restore: drop the final checkpoint; both processes resume from step 3 and redo steps 4-6.
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    (workdir / "metrics.jsonl").rename(workdir / "first_metrics.jsonl")
    outputs = run_two_processes(workdir, decoder_dir)
    assert any("resumed from step 3" in out for out in outputs)
    again = losses_of(workdir)
    assert sorted(again) == [4, 5, 6]
    np.testing.assert_allclose([again[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)], rtol=1e-5,
                               atol=1e-6)

    # A workdir held by another live run: process 0 is refused, and process 1 stops with it (one lock
    # per run, held by process 0; the others follow its outcome), naming the holder; nothing changes.
    (workdir / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                    "started": "2026-12-06T00:00:00"}) + "\n")
    before = (workdir / "metrics.jsonl").read_text()
    outputs = run_two_processes(workdir, decoder_dir, expect_ok=False)
    assert f"is in use by another run: process {os.getpid()}" in outputs[0]
    assert "is in use by another run" in outputs[1]
    assert (workdir / "metrics.jsonl").read_text() == before and json.loads(
        (workdir / "lock.json").read_text())["pid"] == os.getpid()
