"""The trainer spine with a fake model: a linear regression whose batch of step n is a pure function of
(seed, n). It trains, stops after k steps, resumes exactly, and runs an evaluator from config.evals
whose scalar and image land in metrics.jsonl and TensorBoard (the event file is read back)."""

from __future__ import annotations

import dataclasses

import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dediffusion_jax.evaluation import evaluators as evaluators_lib
from dediffusion_jax.train import checkpoint as ckpt_lib, trainer

BATCH, DIM = 8, 4


def regression_task(seed: int = 0, evaluators: list | None = None) -> trainer.Task:
    tx = optax.adam(0.1)
    true_w = np.arange(1, DIM + 1, dtype=np.float32)

    def batch_for_step(step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, step])
        x = rng.normal(size=(BATCH, DIM)).astype(np.float32)
        return {"x": x, "y": x @ true_w + 0.01 * rng.normal(size=BATCH).astype(np.float32)}

    def init(key, inputs):
        del inputs
        params = {"w": jax.random.normal(key, (DIM,))}
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    def step_fn(state, frozen, batch, rng):
        noise = 1e-3 * jax.random.normal(jax.random.fold_in(rng, state["step"]), (DIM,))
        loss_fn = lambda p: jnp.mean(jnp.square(batch["x"] @ (p["w"] + noise) * frozen["scale"] - batch["y"]))  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, {"loss": loss}

    return trainer.Task(
        init=init, step_fn=step_fn, data=trainer.StepIndexedIterator(batch_for_step),
        example_batch={"x": jax.ShapeDtypeStruct((BATCH, DIM), jnp.float32),
                       "y": jax.ShapeDtypeStruct((BATCH,), jnp.float32)},
        seed=seed, rng_seed=seed + 1, frozen={"scale": np.float32(1.0)},
        view=lambda state, frozen: np.asarray(state["params"]["w"]),
        evaluators=evaluators or [],
        checkpoint_json=lambda: {"config": {"seed": seed}},
    )


def losses_of(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def run(workdir: Path, total: int, **settings) -> tuple[dict, trainer.Trainer]:
    t = trainer.Trainer(regression_task(), workdir,
                        trainer.Settings(total_steps=total, progress_every=2, tensorboard=False, **settings))
    return t.run(), t


def test_a_stopped_run_resumes_exactly(tmp_path):
    reference, ref_trainer = run(tmp_path / "ref", 6, checkpoint_every=4)
    assert reference["step"] == 6 and not reference["preempted"]
    assert sorted(p.name for p in (tmp_path / "ref/checkpoints").iterdir()) == ["4", "6"]
    assert {"state", "data", "config"} <= {p.name for p in (tmp_path / "ref/checkpoints/6").iterdir()}
    # The data item is grain's per-process file holding the step-indexed iterator's position.
    assert json.loads((tmp_path / "ref/checkpoints/6/data/process_0-of-1.json").read_text()) == {"step": 6}

    stopped, _ = run(tmp_path / "run", 6, stop_after_steps=3)
    assert stopped["step"] == 3 and stopped["preempted"]
    resumed, resumed_trainer = run(tmp_path / "run", 6)
    assert resumed["start_step"] == 3 and resumed["step"] == 6
    np.testing.assert_array_equal(np.asarray(resumed_trainer.state["params"]["w"]),
                                  np.asarray(ref_trainer.state["params"]["w"]))
    assert losses_of(tmp_path / "run") == losses_of(tmp_path / "ref")

    # A finished run resumes at its end and trains nothing; restore_latest reads the state alone.
    again, _ = run(tmp_path / "run", 6)
    assert again["start_step"] == again["step"] == 6
    restored = trainer.Trainer(regression_task(), tmp_path / "run", trainer.Settings(total_steps=6)).restore_latest()
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.asarray(ref_trainer.state["params"]["w"]))


def test_a_stop_right_after_a_periodic_save_saves_once(tmp_path):
    summary, _ = run(tmp_path, 6, checkpoint_every=2, stop_after_steps=2)
    assert summary["step"] == 2 and summary["preempted"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["2"]
    assert trainer.Trainer(regression_task(), tmp_path, trainer.Settings(total_steps=6)).latest_step() == 2


def test_a_corrupt_checkpoint_is_an_error(tmp_path):
    run(tmp_path, 2)
    for f in (tmp_path / "checkpoints/2/state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    with pytest.raises(ckpt_lib.CheckpointError, match="failed to restore checkpoint step 2"):
        run(tmp_path, 4)


class ProbeEvaluator:
    """A test evaluator: the norm of the weights the view shows, and a 4x4 image of them."""

    def __init__(self, name: str, every_steps: int, run_config, size: int = 4):
        self.name, self.every_steps, self.size = name, every_steps, size
        self.calls = 0

    def run(self, view) -> evaluators_lib.EvalResult:
        self.calls += 1
        w = np.asarray(view, np.float32)
        image = np.full((self.size, self.size, 3), np.clip(w[0] / 10, 0, 1), np.float32)
        return evaluators_lib.EvalResult(scalars={"norm": float(np.linalg.norm(w))}, images={"weights": image})


def tensorboard_events(logdir: Path) -> list:
    """Every Event of the TensorBoard files in `logdir` (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


def test_an_evaluator_from_config_evals_writes_scalars_and_an_image_to_tensorboard(tmp_path):
    evaluators_lib.register_evaluator("test.probe", ProbeEvaluator)
    config = ml_collections.ConfigDict({"evals": {"probe": {"type": "test.probe", "every_steps": 2, "size": 4}}})
    evals = evaluators_lib.build_evaluators(config)
    t = trainer.Trainer(regression_task(evaluators=evals), tmp_path,
                        trainer.Settings(total_steps=5, tensorboard=True))
    t.run()
    assert evals[0].calls == 3  # steps 2, 4 and the last (5)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/probe/norm" in r] == [2, 4, 5]

    events = tensorboard_events(tmp_path / "tensorboard")
    tags = {(e.step, v.tag, v.WhichOneof("value")) for e in events if e.HasField("summary") for v in e.summary.value}
    assert (4, "eval/probe/norm", "simple_value") in tags
    assert (5, "eval/probe/weights", "image") in tags
    image = next(v.image for e in events if e.HasField("summary") for v in e.summary.value
                 if v.tag == "eval/probe/weights")
    assert (image.height, image.width) == (4, 4)
    assert ("loss" in {tag for _, tag, _ in tags})


# ------------------------------------------------------------------------------ issue 17: the workdir


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_workdir_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    import os
    import socket

    from dediffusion_jax.train import workdir as workdir_lib

    tmp_path.mkdir(exist_ok=True)
    lock = tmp_path / "lock.json"
    host = socket.gethostname()
    lock.write_text(json.dumps({"host": host, "pid": os.getppid(), "started": "2026-12-01T10:00:00"}))
    with pytest.raises(workdir_lib.WorkdirLockedError) as info:
        run(tmp_path, 2)
    message = str(info.value)
    assert f"process {os.getppid()} on {host}, started 2026-12-01T10:00:00" in message and "\n" not in message
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was written

    # Another host's live-looking lock: refused too (its liveness cannot be checked from here).
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "t"}))
    with pytest.raises(workdir_lib.WorkdirLockedError, match="on elsewhere"):
        run(tmp_path, 2)

    # A lock left by a killed process on this host: taken over with a warning; released at the end.
    gone = dead_pid()
    lock.write_text(json.dumps({"host": host, "pid": gone, "started": "t"}))
    with caplog.at_level("WARNING"):
        summary, _ = run(tmp_path, 2)
    assert summary["step"] == 2 and not lock.exists()
    assert f"taking over the workdir lock {lock} of process {gone}" in caplog.text

    # While a run holds it, a second run on the workdir is refused (the lock is the first's).
    with workdir_lib.WorkdirLock(tmp_path):
        held = json.loads(lock.read_text())
        assert held["pid"] == os.getpid() and held["host"] == host
    assert not lock.exists()


def test_after_an_interrupted_save_every_step_is_logged_once(tmp_path, caplog):
    """A run killed after step 6 whose save of step 6 never completed (orbax's tmp folder is left)
    resumes from 4: the warning names the incomplete folder, metrics.jsonl has each step once with
    the uninterrupted run's losses, and TensorBoard is told to purge the events past step 4."""
    run(tmp_path / "ref", 8, checkpoint_every=4)
    workdir = tmp_path / "run"
    run(workdir, 6, checkpoint_every=4, stop_after_steps=6)
    (workdir / "checkpoints/6").rename(workdir / "checkpoints/6.orbax-checkpoint-tmp-1234")
    assert [json.loads(r)["step"] for r in (workdir / "metrics.jsonl").read_text().splitlines()
            if "loss" in r] == [1, 2, 3, 4, 5, 6]

    with caplog.at_level("WARNING"):
        resumed = trainer.Trainer(regression_task(), workdir, trainer.Settings(
            total_steps=8, checkpoint_every=4, tensorboard=True)).run()
    assert resumed["start_step"] == 4 and resumed["step"] == 8
    assert "incomplete checkpoint" in caplog.text and "6.orbax-checkpoint-tmp-1234" in caplog.text
    steps = [json.loads(r)["step"] for r in (workdir / "metrics.jsonl").read_text().splitlines()
             if "loss" in r]
    assert steps == list(range(1, 9))  # each once, in order (without the truncation: 5, 6 twice)
    assert losses_of(workdir) == losses_of(tmp_path / "ref")
    purges = [e.step for e in tensorboard_events(workdir / "tensorboard")
              if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert 5 in purges


def test_sigterm_during_the_first_compile_stops_with_a_message(tmp_path, monkeypatch, caplog):
    import os
    import signal

    from dediffusion_jax.train import step as step_lib

    compile_step = step_lib.compile_step

    def compile_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while compiling
        return compile_step(*args, **kwargs)

    monkeypatch.setattr(step_lib, "compile_step", compile_then_signal)
    with caplog.at_level("WARNING"):
        summary, _ = run(tmp_path, 4)
    assert summary["preempted"] and summary["step"] == 0
    assert "stopped by signal before the first step" in caplog.text
    assert not (tmp_path / "lock.json").exists()


def test_a_source_that_yields_nothing_fails_before_the_compile(tmp_path, monkeypatch):
    """A folder of only broken files is reported at once, not after minutes of compiling."""
    from dediffusion_jax.train import step as step_lib

    class Broken(trainer.StepIndexedIterator):
        def __next__(self):
            raise RuntimeError("1000 consecutive examples failed to load")

    compiled = []
    compile_step = step_lib.compile_step
    monkeypatch.setattr(step_lib, "compile_step", lambda *a, **k: compiled.append(1) or compile_step(*a, **k))
    task = dataclasses.replace(regression_task(), data=Broken(lambda step: None))
    with pytest.raises(RuntimeError, match="consecutive examples failed"):
        trainer.Trainer(task, tmp_path, trainer.Settings(total_steps=2, tensorboard=False)).run()
    assert compiled == []
