"""`python tests/helpers/fault_run.py WORKDIR TOTAL`: the fake-model spine run of tests/test_trainer.py
as its own process, for fault injection (tests/test_faults.py). Environment:
  FAULT_STEP_SLEEP=S      sleep S seconds after each step (time to interrupt it)
  FAULT_KILL_AT_SAVE=N    SIGKILL this process right after the save of step N has started (the async
                          write is cut short, as a pre-emption without grace would)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

from dediffusion_jax.train import checkpoint as ckpt_lib, trainer  # noqa: E402
from test_trainer import regression_task  # noqa: E402


def main() -> None:
    workdir, total = sys.argv[1], int(sys.argv[2])
    sleep = float(os.environ.get("FAULT_STEP_SLEEP", "0"))
    kill_at = int(os.environ.get("FAULT_KILL_AT_SAVE", "-1"))
    save_items = ckpt_lib.save_items

    def save_then_die(manager, step, *args, **kwargs):
        save_items(manager, step, *args, **kwargs)
        if int(step) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.ckpt_lib.save_items = save_then_die
    task = regression_task()
    task.after_step = lambda *a: time.sleep(sleep)
    summary = trainer.Trainer(task, workdir, trainer.Settings(
        total_steps=total, checkpoint_every=3, progress_every=1000, tensorboard=True)).run()
    print(f"done {summary['start_step']} -> {summary['step']}", flush=True)


if __name__ == "__main__":
    main()
