"""User errors, and how every command reports them: one `error: ...` line and a non-zero exit.

Standard library only (launchers and `--help` paths import it without jax).

A `UserError` is a mistake in what the user gave: a path, a file, a config value, a checkpoint that
does not fit. The project's own error types inherit it (next to the builtin they always were, so
`except ValueError` keeps working). An `OSError` that names a file (`e.filename`) is about a path the
user gave (a missing, unreadable or mistyped file or folder) and is reported the same way. Anything
else is a bug and keeps its traceback; `--debug` (or DEDIFFUSION_DEBUG=1) keeps the traceback of a
user error too.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Optional, Sequence

DEBUG_FLAG = "--debug"
DEBUG_HELP = "show the traceback of a user error (a bad path, file or value) instead of one line"


class UserError(Exception):
    """A mistake in the user's input. `exit_code` is the command's exit status (default 2)."""

    exit_code = 2


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, UserError) or (isinstance(e, OSError) and e.filename is not None)


def message(e: BaseException) -> str:
    """The error as the user reads it: no `[Errno N]`, an OSError's file named."""
    text = str(e)
    if isinstance(e, OSError) and not isinstance(e, UserError) and e.strerror:
        names = [n for n in (e.filename, e.filename2) if n is not None]
        text = f"{e.strerror}: " + " -> ".join(str(n) for n in names)
    return re.sub(r"^\[Errno \d+\] ", "", text)


def debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("DEDIFFUSION_DEBUG", "") not in ("", "0")


def run_main(main: Callable[[list], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """`main(argv)` with user errors turned into one `error: ...` line on stderr and their exit code.

    argv defaults to sys.argv[1:]; `--debug` stays in it (the command's parser declares it).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(main(argv) or 0)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the user's
        if debug_requested(argv) or not is_user_error(e):
            raise
        print(f"error: {message(e)}", file=sys.stderr, flush=True)
        return int(getattr(e, "exit_code", 2))
