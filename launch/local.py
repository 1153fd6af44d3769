"""Train on this machine (CPU or its GPUs), optionally as N local processes that act as N hosts.

    python launch/local.py --config projects/miniworld/configs/world.py --workdir workdirs/run1 \\
        [--config.key=value ...] [--platform auto|cpu|gpu] [--devices-per-process K] \\
        [--processes N] [--port P] [--dry-run]

One process (default): runs the trainer in the repo's .venv with a sensible environment:
on GPU, XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.90); on CPU, JAX_PLATFORMS=cpu and, with
--devices-per-process K, K fake CPU devices (--xla_force_host_platform_device_count) so sharded
code paths run on a laptop.

--processes N > 1 simulates a multi-host job on localhost: N CPU processes, each with
K devices (default 1) and JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port> / JAX_NUM_PROCESSES=N /
JAX_PROCESS_ID=i, so `initialize_distributed()` starts jax.distributed with gloo CPU collectives.
Process 0 prints to this terminal, the others log to LOG_DIR/process_<i>.log; if one fails, the
others are stopped. --dry-run prints one command per process (`env VAR=... python -m ...`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch/local.py", allow_abbrev=False,
        description="Train dediffusion_jax on this machine (optionally as N local 'hosts').",
        epilog="Any --config.key=value (or --config.key value, or anything after --) is passed "
               "to the trainer unchanged.")
    p.add_argument("--config", help="experiment config, e.g. projects/miniworld/configs/world.py")
    p.add_argument("--workdir", help="checkpoints and metrics (a local path or gs://)")
    p.add_argument("--platform", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: whatever JAX finds (default); cpu / gpu: force it")
    p.add_argument("--processes", type=int, default=1,
                   help="local processes acting as hosts (CPU, jax.distributed; default 1)")
    p.add_argument("--devices-per-process", type=int, default=None,
                   help="fake CPU devices per process (xla_force_host_platform_device_count); "
                        "default: JAX's own (1) for one process, 1 with --processes")
    p.add_argument("--mem-fraction", default="0.90",
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION on GPU (default %(default)s)")
    p.add_argument("--port", type=int, default=None,
                   help="coordinator port for --processes > 1 (default: a free one)")
    p.add_argument("--python", default=None,
                   help="interpreter (default: the repo's .venv/bin/python, else this one)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for the processes (repeatable)")
    p.add_argument("--log-dir", default=None,
                   help="logs of processes 1..N-1 (default WORKDIR/launch_logs)")
    p.add_argument("--module", default=_common.TRAIN_MODULE, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    return p


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_envs(a: argparse.Namespace) -> List[Dict[str, str]]:
    """The variables this launcher sets for each process (on top of the inherited environment)."""
    base: Dict[str, str] = {}
    platform = "cpu" if a.processes > 1 else a.platform
    if platform == "cpu":
        base["JAX_PLATFORMS"] = "cpu"
    elif platform == "gpu":
        base["JAX_PLATFORMS"] = "cuda"
    if platform in ("gpu", "auto"):
        base["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(a.mem_fraction)
    k = a.devices_per_process or (1 if a.processes > 1 else None)
    if k is not None and platform == "cpu":
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        base["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={k}"])
    base.update(dict(a.env))
    if a.processes == 1:
        return [base]
    envs = []
    for i in range(a.processes):
        env = dict(base)
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{a.port}",
                   JAX_NUM_PROCESSES=str(a.processes), JAX_PROCESS_ID=str(i),
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
        envs.append(env)
    return envs


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_processes(cmd: List[str], envs: List[Dict[str, str]], log_dir: str) -> int:
    """Starts one process per env; process 0 on this terminal, the rest into log files.
    Returns the first non-zero exit code (stopping the others) or 0 when all succeed."""
    if len(envs) == 1:
        return subprocess.call(cmd, env={**os.environ, **envs[0]})
    os.makedirs(log_dir, exist_ok=True)
    procs: List[subprocess.Popen] = []
    logs = []
    try:
        for i, env in enumerate(envs):
            out = None
            if i > 0:
                out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
                logs.append(out)
            procs.append(subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out,
                                          stderr=subprocess.STDOUT if out else None))
        print(f"started {len(procs)} processes (pids {[p.pid for p in procs]}); "
              f"logs of processes 1..{len(procs) - 1} in {log_dir}", file=sys.stderr)
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, c = failed[0]
                print(f"error: process {i} exited with {c}; stopping the others", file=sys.stderr)
                _stop(procs)
                return c
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs)
        return 130
    finally:
        for f in logs:
            f.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _parser()
    own, passthrough = _common.split_passthrough(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(own)
    missing = [f"--{n}" for n in ("config", "workdir") if not getattr(a, n)]
    if missing:
        p.error("missing required argument(s): " + ", ".join(missing))
    if a.processes < 1:
        p.error("--processes must be >= 1")
    if a.devices_per_process is not None and a.devices_per_process < 1:
        p.error("--devices-per-process must be >= 1")
    if a.processes > 1 and a.platform == "gpu":
        p.error("--processes > 1 simulates hosts on CPU; one process already uses all local GPUs")
    if a.devices_per_process and a.platform == "gpu":
        p.error("--devices-per-process makes fake CPU devices; it does not apply to --platform gpu")
    if a.devices_per_process and a.platform == "auto" and a.processes == 1:
        a.platform = "cpu"  # fake devices only exist on the CPU platform
    a.env = _common.env_assignments(a.env, p)
    if a.processes > 1 and a.port is None:
        a.port = free_port()
    python = a.python or _common.default_python()
    cmd = _common.train_argv(python, a.config, a.workdir, passthrough, a.module)
    envs = process_envs(a)
    if a.dry_run:
        if len(envs) > 1:
            print(f"# {len(envs)} processes, run concurrently; process 0 is the coordinator")
        for env in envs:
            _common.show(["env", *(f"{k}={v}" for k, v in env.items()), *cmd])
        return 0
    log_dir = a.log_dir or os.path.join(a.workdir, "launch_logs")
    if len(envs) > 1 and _common.is_gcs(log_dir):
        p.error("with a gs:// --workdir give a local --log-dir for the process logs")
    print("+ " + shlex.join(cmd), file=sys.stderr)
    return run_processes(cmd, envs, log_dir)


if __name__ == "__main__":
    sys.exit(main())
