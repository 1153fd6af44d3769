"""Shared pieces of the launchers (stdlib only, importable by any python3 >= 3.8; the flag grammar
comes from dediffusion_jax/cli_flags.py, also stdlib only).

Every launcher builds the same training command line,

    PYTHON -m dediffusion_jax.train --config CONFIG --workdir WORKDIR [--config.key=value ...]

and either prints the commands that would run it (--dry-run) or runs them. Commands are kept as
argv lists until the last moment and rendered with shlex.join, so every printed line is a shell
command that `shlex.split` turns back into exactly the argv that would have been executed.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
# The trainer's own flag grammar (stdlib only), so a launcher splits `--config.KEY ...` exactly as the
# trainer reads it: split_passthrough(argv) -> (launcher flags, tokens passed to the trainer).
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from dediffusion_jax.cli_flags import split_passthrough  # noqa: E402,F401

TRAIN_MODULE = "dediffusion_jax.train"
DEFAULT_JAX_VERSION = "0.10.2"


def train_argv(python: str, config: str, workdir: str, passthrough: Sequence[str],
               module: str = TRAIN_MODULE) -> List[str]:
    """The trainer's argv: `python -m dediffusion_jax.train --config C --workdir W [overrides]`."""
    return [python, "-m", module, "--config", config, "--workdir", workdir, *passthrough]


def env_assignments(pairs: Iterable[str], parser: argparse.ArgumentParser) -> List[Tuple[str, str]]:
    """Parses repeated `--env KEY=VALUE` into (key, value), rejecting malformed ones."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            parser.error(f"--env expects KEY=VALUE with a shell variable name, got {pair!r}")
        out.append((key, value))
    return out


def export_prefix(env: Sequence[Tuple[str, str]]) -> str:
    """`export K1=V1 K2=V2 && ` (values quoted), or '' for no variables."""
    if not env:
        return ""
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env) + " && "


def jax_version(repo_root: Path = REPO_ROOT) -> str:
    """The jax version pinned in constraints.txt (the accelerator wheels must match it)."""
    try:
        text = (repo_root / "constraints.txt").read_text()
    except OSError:
        return DEFAULT_JAX_VERSION
    m = re.search(r"^jax==([^\s;#]+)", text, flags=re.M)
    return m.group(1) if m else DEFAULT_JAX_VERSION


def require_tool(name: str) -> str:
    """Absolute path of `name` on PATH, or a clear exit (code 2) if it is missing."""
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"error: `{name}` not found on PATH; install it (or use --dry-run to "
                         f"just print the commands)")
    return path


def show(cmd: Sequence[str] | str, stream=None) -> str:
    line = cmd if isinstance(cmd, str) else shlex.join(cmd)
    print(line, file=stream or sys.stdout, flush=True)
    return line


def run_commands(cmds: Sequence[Sequence[str]], dry_run: bool, tools: Sequence[str] = ()) -> int:
    """Prints each command (one line each); unless dry_run, runs them in order, stopping at the
    first failure. In dry-run nothing is executed and `tools` are not even looked up."""
    if dry_run:
        for cmd in cmds:
            show(cmd)
        return 0
    for tool in tools:
        require_tool(tool)
    for cmd in cmds:
        show("+ " + shlex.join(cmd), sys.stderr)
        rc = subprocess.call(list(cmd))
        if rc != 0:
            print(f"error: command failed with exit code {rc}: {shlex.join(cmd)}", file=sys.stderr)
            return rc
    return 0


def default_python(repo_root: Path = REPO_ROOT) -> str:
    """The repo's .venv interpreter when it exists (as `make install` creates it), else this one."""
    venv = repo_root / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def is_gcs(path: str) -> bool:
    return path.startswith("gs://")

