"""What keeps a run's workdir consistent (issue 17): one run at a time, every step logged once.

- `WorkdirLock`: WORKDIR/lock.json names the run that holds the workdir (host, pid, start time); a
  second run is refused naming it; a lock whose process is gone (same host, pid not alive) is taken
  over with a warning. Multi-host: process 0 holds it (the trainer spine agrees on the outcome).
- `truncate_jsonl`: after restoring step S, rows past S (written by the interrupted invocation after
  its last checkpoint) are dropped, atomically, so the resumed run writes each step once.
- `incomplete_checkpoints`: the folders an interrupted save left behind (orbax's *tmp* folders).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from dediffusion_jax.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "lock.json"


class WorkdirLockedError(UserError, RuntimeError):
    """Another live run holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir):` or acquire()/release(). Raises WorkdirLockedError when held."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_NAME
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": "?", "pid": -1, "started": "?"}  # unreadable: treat as a dead holder

    def acquire(self) -> None:
        for _ in range(3):  # a stale lock taken over by someone else between our steps: look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self.holder()
                if held is None:
                    continue
                same_host = held.get("host") == self.me["host"]
                pid = int(held.get("pid", -1))
                if pid == self.me["pid"] and same_host:
                    self.held = True  # ours (a second Trainer in this process)
                    return
                if (same_host and not _alive(pid)) or pid < 0:
                    log.warning("taking over the workdir lock %s of process %s on %s (started %s): "
                                "that process is gone", self.path, pid, held.get("host"), held.get("started"))
                    self.path.unlink(missing_ok=True)
                    continue
                raise WorkdirLockedError(
                    f"{self.path.parent} is in use by another run: process {pid} on "
                    f"{held.get('host')}, started {held.get('started')} ({self.path}). Wait for it to "
                    f"finish or stop it (SIGTERM saves a checkpoint), or use another workdir"
                    + ("" if same_host else "; if that run is dead, remove the lock file"))
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me) + "\n")
            self.held = True
            return
        raise WorkdirLockedError(f"could not take the workdir lock {self.path}: it keeps changing hands")

    def release(self) -> None:
        if self.held and (self.holder() or {}).get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> int:
    """Keeps the rows of a JSONL file whose "step" is <= last_step (atomically); returns how many
    rows were dropped. A missing file is left missing; an unparsable line (a write cut short) goes."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = int(json.loads(line).get("step", -1))
        except (ValueError, AttributeError):
            dropped += 1
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def incomplete_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Folders under checkpoint_dir that an interrupted save left (orbax writes STEP.orbax-
    checkpoint-tmp-* and renames it when complete)."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.isdigit() and "tmp" in p.name)
