"""The training program end to end on a tiny random decoder folder and a tiny ViT.

One uninterrupted reference run (in this process) is shared by the tests; a second run is started as a
subprocess through the real command line, pre-empted with SIGTERM after its first checkpoint, resumed,
and must reproduce the reference losses step for step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from projects.miniworld import scenes
from projects.miniworld import tokenizer as world_tokenizer
from dediffusion_jax.t2i import folder
from dediffusion_jax.train import checkpoint as ckpt_lib, cli
from dediffusion_jax.train import loop
from helpers import tiny_decoder as tiny

REPO = Path(__file__).resolve().parents[1]
TOTAL = 24
EVERY = 4

# Tiny versions of projects/miniworld/configs/world.py, as command-line overrides (the same strings a user types).
TINY = {
    "backbone.overrides.hidden_size": 32, "backbone.overrides.num_layers": 1,
    "backbone.overrides.num_heads": 2, "backbone.overrides.mlp_dim": 64,
    "encoder.num_queries": 6, "encoder.pooler_blocks": 1, "encoder.pooler_width": 32,
    "encoder.pooler_heads": 2, "batch_size": 8, "total_steps": TOTAL, "lr.warmup_steps": 2,
    "checkpoint.every_steps": EVERY, "checkpoint.keep": 2, "log.samples_every": 8,
    "log.progress_every": 4, "log.num_samples": 2, "log.tensorboard": True,
}


def write_decoder(path: Path, seed: int) -> Path:
    folder.save_decoder(tiny.random_decoder("pixel", world_tokenizer.DEFAULT_DIR, seed=seed), path)
    return path


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    return write_decoder(tmp_path_factory.mktemp("decoder") / "tiny", seed=0)


def tiny_config(decoder_dir: Path, **extra):
    config = cli.load_config_file(f"{REPO}/projects/miniworld/configs/world.py:decoder={decoder_dir},eval_every=0")
    config.update_from_flattened_dict({**TINY, **extra})
    return config


def losses_of(workdir: Path) -> dict[int, float]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


class TextsEvaluator:
    """A test evaluator: the texts the encoder being trained gives two held-out scenes."""

    def __init__(self, name, every_steps, run_config):
        self.name, self.every_steps = name, every_steps

    def run(self, view):
        from dediffusion_jax.evaluation.evaluators import EvalResult

        images = scenes.images_of(scenes.split_indices("heldout")[:2])
        texts = view.texts(images)
        assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
        return EvalResult(scalars={"num_tokens": float(view.token_ids(images).shape[1])},
                          images={"scene": (images[0] + 1) / 2})


@pytest.fixture(scope="module")
def reference(decoder_dir, tmp_path_factory):
    from dediffusion_jax.evaluation import evaluators

    evaluators.register_evaluator("test.texts", TextsEvaluator)
    workdir = tmp_path_factory.mktemp("reference")
    config = tiny_config(decoder_dir)
    with config.unlocked():
        config.evals = {"texts": {"type": "test.texts", "every_steps": 12}}
    summary = loop.train_and_evaluate(config, workdir)
    return workdir, summary


def test_a_run_trains_and_writes_metrics_samples_and_checkpoints(reference):
    workdir, summary = reference
    assert summary["step"] == TOTAL and not summary["preempted"]
    losses = losses_of(workdir)
    assert sorted(losses) == list(range(1, TOTAL + 1))
    assert all(np.isfinite(v) for v in losses.values())
    last = [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
    for key in ("temperature", "learning_rate", "grad_norm", "param_norm", "token_entropy",
                "distinct_tokens", "images_per_s", "images_per_s_per_device", "step_time_s",
                "tflops_per_s"):
        assert np.isfinite(last[key]), key
    assert last["temperature"] == pytest.approx(0.3 * (2.0 / 0.3) ** (1 / TOTAL), rel=1e-3)
    samples = [json.loads(s) for s in (workdir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {8, 16, 24} and all(isinstance(s["text"], str) for s in samples)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [20, 24]  # keep 2
    assert {"state", "data", "config", "decoder"} <= {p.name for p in (workdir / "checkpoints/24").iterdir()}
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    # The config's evaluator ran inside training with the encoder's view (every 12 steps and the last).
    evals = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval/texts/num_tokens"]) for r in evals if "eval/texts/num_tokens" in r] == [
        (12, 6.0), (24, 6.0)]
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == TOTAL


def test_sigterm_saves_and_the_resumed_run_reproduces_the_losses(reference, decoder_dir, tmp_path):
    ref_losses = losses_of(reference[0])
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dediffusion_jax.train", "--config", f"projects/miniworld/configs/world.py:decoder={decoder_dir},eval_every=0",
           "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in TINY.items()]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (workdir / "checkpoints" / str(EVERY)).is_dir():  # the first checkpoint
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "stopped by signal" in output
    first = losses_of(workdir)
    stopped_at = max(first)
    assert EVERY <= stopped_at < TOTAL, "SIGTERM came too late to interrupt the run"
    assert (workdir / "checkpoints" / str(stopped_at)).is_dir()

    summary = loop.train_and_evaluate(tiny_config(decoder_dir), workdir)  # resumes by itself
    assert summary["start_step"] == stopped_at and summary["step"] == TOTAL
    resumed = losses_of(workdir)
    assert sorted(resumed) == list(range(1, TOTAL + 1))
    # Each step exactly once (losses_of, a dict keyed by step, could not see a duplicated row).
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, TOTAL + 1))
    history = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]
    assert [(h["event"], h["step"]) for h in history] == [("start", 0), ("resume", stopped_at)]
    assert not (workdir / "lock.json").exists()  # released by the SIGTERM-ed run and the resumed one
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                               [ref_losses[s] for s in sorted(ref_losses)], rtol=0, atol=1e-6)


def test_a_corrupt_checkpoint_is_an_error_not_a_fresh_start(reference, decoder_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    for f in (workdir / "checkpoints/24/state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage" * 3)
    with pytest.raises(ckpt_lib.CheckpointError, match="failed to restore checkpoint step 24"):
        loop.train_and_evaluate(tiny_config(decoder_dir, **{"total_steps": TOTAL + 2,
                                                            "resume.allow_changes": "total_steps"}), workdir)
    assert max(losses_of(workdir)) == TOTAL  # nothing was trained from scratch


def test_a_different_decoder_is_refused(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    other = write_decoder(tmp_path / "other_decoder", seed=1)
    with pytest.raises(ckpt_lib.DecoderMismatchError, match="weights hash"):
        loop.train_and_evaluate(tiny_config(other, total_steps=TOTAL + 2), workdir)


def test_a_resume_with_another_config_is_refused_naming_each_change(reference, decoder_dir, tmp_path):
    """Another batch size, learning rate or number of tokens is refused in one line BEFORE orbax
    reads the state (no shape error, no advice to delete anything); logging changes are free."""
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    changed = {"batch_size": 16, "lr.peak": 0.5, "encoder.num_queries": 7, "log.progress_every": 1}
    with pytest.raises(ckpt_lib.ConfigChangedError) as info:
        loop.train_and_evaluate(tiny_config(decoder_dir, **changed), workdir)
    message = str(info.value)
    assert "\n" not in message and "delete" not in message.lower()
    assert "batch_size: 8 -> 16" in message and "encoder.num_queries: 6 -> 7" in message
    assert "lr.peak: 0.001 -> 0.5" in message and "progress_every" not in message
    assert "--config.resume.allow_changes=batch_size,encoder.num_queries,lr.peak" in message
    assert max(losses_of(workdir)) == TOTAL  # nothing trained

    # Extending the run on purpose: accepted, recorded in history.jsonl, config.json updated.
    summary = loop.train_and_evaluate(tiny_config(decoder_dir, **{
        "total_steps": TOTAL + 2, "resume.allow_changes": "total_steps", "log.samples_every": 0}),
        workdir)
    assert summary["start_step"] == TOTAL and summary["step"] == TOTAL + 2
    history = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "resume"]
    assert history[-1]["step"] == TOTAL and history[-1]["config_changes"] == {"total_steps": [TOTAL, TOTAL + 2]}
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == TOTAL + 2
