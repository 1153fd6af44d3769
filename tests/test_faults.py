"""Fault injection (issue 17): a run interrupted by SIGKILL during a save, SIGTERM and SIGKILL between
steps, then resumed to the end, ends with the params, optimizer state, data position and per-step
losses of an uninterrupted run, every step logged once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import jax

from dediffusion_jax.train import trainer
from test_trainer import losses_of, regression_task, run

REPO = Path(__file__).resolve().parents[1]
TOTAL = 16


def start(workdir: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "tests/helpers/fault_run.py", str(workdir), str(TOTAL)],
                            cwd=REPO, env={**os.environ, "FAULT_STEP_SLEEP": "0.15", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def last_step(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]
    return max(steps, default=0)


def interrupt_after(proc: subprocess.Popen, workdir: Path, step: int, sig: int) -> str:
    deadline = time.time() + 180
    while last_step(workdir) < step:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return out


def test_sigkill_in_a_save_then_sigterm_then_sigkill_ends_as_the_uninterrupted_run(tmp_path):
    _, reference = run(tmp_path / "ref", TOTAL, checkpoint_every=3)
    workdir = tmp_path / "run"

    # 1. SIGKILL right after the save of step 6 started: that save is cut short.
    proc = start(workdir, FAULT_KILL_AT_SAVE="6")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == -signal.SIGKILL, out
    assert last_step(workdir) == 6
    assert not (workdir / "checkpoints/6").is_dir()  # incomplete: only orbax's tmp folder, if any
    # 2. SIGTERM between steps: saves and exits 0 with a message.
    proc = start(workdir)
    out = interrupt_after(proc, workdir, 9, signal.SIGTERM)
    assert proc.returncode == 0 and "stopped by signal" in out, out
    stopped = last_step(workdir)  # the step in flight when the signal came finishes, then saves
    # 3. SIGKILL between steps (no save): the next run resumes from the last checkpoint.
    proc = start(workdir)
    out = interrupt_after(proc, workdir, 13, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert (workdir / "lock.json").exists()  # left by the killed process: taken over below
    # 4. To the end.
    proc = start(workdir)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0 and f"-> {TOTAL}" in out, out
    assert "taking over the workdir lock" in out

    final = trainer.Trainer(regression_task(), workdir, trainer.Settings(total_steps=TOTAL)).restore_latest()
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(reference.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # params, Adam moments, step
    position = json.loads((workdir / f"checkpoints/{TOTAL}/data/process_0-of-1.json").read_text())
    assert position == {"step": TOTAL}
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, TOTAL + 1))
    assert losses_of(workdir) == losses_of(tmp_path / "ref")
    events = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]
    # start; resume from 3 (the cut-short save of 6 is not used); from SIGTERM's save; from the
    # last periodic save before the SIGKILL.
    assert [(e["event"], e["step"]) for e in events] == [
        ("start", 0), ("resume", 3), ("resume", stopped), ("resume", 12)], events
