"""Train on a SLURM GPU cluster: writes an sbatch script for N nodes x G GPUs (and submits it).

    python launch/slurm_gpu.py --nodes 4 --gpus-per-node 8 --config configs/paper.py \\
        --workdir /shared/runs/run1 [--config.key=value ...] [--partition P] [--account A] \\
        [--time 24:00:00] [--script PATH] [--submit] [--dry-run]

Layout: ONE process per node that owns all of that node's GPUs (`--ntasks-per-node=1`,
`--gpus-per-node=G`). That is the same shape as a TPU pod (one process per host), keeps one data
pipeline per host (the grain pipeline reads a strided shard per process), and needs no per-task
CUDA_VISIBLE_DEVICES juggling; XLA/NCCL still use every GPU of the node and NVLink within it.

The script starts the processes with `srun`, one task per node. The coordinator is the first node
of $SLURM_JOB_NODELIST (`scontrol show hostnames`), and every task exports
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (= $SLURM_PROCID), so
`initialize_distributed()` starts jax.distributed explicitly rather than relying on auto-detection.

Without --submit the script is written and the sbatch command printed; --submit runs it;
--dry-run prints the script and the sbatch command and writes/submits nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch/slurm_gpu.py", allow_abbrev=False,
        description="Write (and optionally sbatch) a multi-node SLURM script for dediffusion_jax.",
        epilog="Any --config.key=value (or --config.key value, or anything after --) is passed "
               "to the trainer unchanged.")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node (default %(default)s)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs for the one process per node (data loading); default: not set")
    p.add_argument("--mem", default=None, help="memory per node, e.g. 0 (all) or 500G")
    p.add_argument("--config", help="experiment config, e.g. configs/paper.py or configs/x.py:arg")
    p.add_argument("--workdir", help="checkpoints/metrics; a path on a filesystem every node "
                                     "shares (or gs://)")
    p.add_argument("--job-name", default="dediffusion", help="SLURM job name (default %(default)s)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--time", default=None, help="wall-clock limit, e.g. 24:00:00")
    p.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=True,
                   help="whole nodes (default on)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="FLAG",
                   help="extra '#SBATCH FLAG' line, e.g. --sbatch-arg=--constraint=h100 "
                        "(repeatable)")
    p.add_argument("--repo-dir", default=str(_common.REPO_ROOT),
                   help="checkout on the shared filesystem the job runs in (default: this one)")
    p.add_argument("--python", default=None,
                   help="interpreter on the nodes (default REPO_DIR/.venv/bin/python)")
    p.add_argument("--port", type=int, default=None,
                   help="coordinator port (default: derived from the job id, as JAX does)")
    p.add_argument("--mem-fraction", default="0.90",
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION (default %(default)s)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable exported in the script (repeatable)")
    p.add_argument("--log-dir", default=None,
                   help="where SLURM writes %%x-%%j.out (default REPO_DIR/slurm_logs)")
    p.add_argument("--script", default=None,
                   help="path of the script to write (default LOG_DIR/JOB_NAME.sbatch)")
    p.add_argument("--submit", action="store_true", help="sbatch the script after writing it")
    p.add_argument("--module", default=_common.TRAIN_MODULE, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true",
                   help="print the script and the sbatch command; write and submit nothing")
    return p


def render_script(a: argparse.Namespace, passthrough: Sequence[str]) -> str:
    """The sbatch script: #SBATCH header, env, srun of one training process per node."""
    sb = [f"--job-name={a.job_name}", f"--nodes={a.nodes}", "--ntasks-per-node=1",
          f"--gpus-per-node={a.gpus_per_node}"]
    if a.cpus_per_task:
        sb.append(f"--cpus-per-task={a.cpus_per_task}")
    if a.mem is not None:
        sb.append(f"--mem={a.mem}")
    for name in ("partition", "account", "qos", "time"):
        if getattr(a, name):
            sb.append(f"--{name}={getattr(a, name)}")
    if a.exclusive:
        sb.append("--exclusive")
    sb.append(f"--output={a.log_dir}/%x-%j.out")
    sb += a.sbatch_arg
    python = a.python or f"{a.repo_dir}/.venv/bin/python"
    train = shlex.join(_common.train_argv(python, a.config, a.workdir, passthrough, a.module))
    # JAX_PROCESS_ID differs per task, so it is set inside the srun'd shell from SLURM_PROCID.
    task = f"export JAX_PROCESS_ID=$SLURM_PROCID && exec {train}"
    port = str(a.port) if a.port else "$(( SLURM_JOB_ID % 4096 + 61440 ))"
    extra = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in a.env)
    lines = ["#!/bin/bash"] + [f"#SBATCH {x}" for x in sb] + [
        "# Generated by launch/slurm_gpu.py: one process per node owning all its GPUs.",
        "set -euo pipefail",
        f"cd {shlex.quote(a.repo_dir)}",
        "",
        "# jax.distributed, explicitly: coordinator = first node of the allocation.",
        'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f'export JAX_COORDINATOR_ADDRESS="$COORDINATOR_HOST:{port}"',
        "export JAX_NUM_PROCESSES=$SLURM_NTASKS",
        "",
        "# GPU memory and collectives.",
        f"export XLA_PYTHON_CLIENT_MEM_FRACTION={shlex.quote(str(a.mem_fraction))}",
        "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
        "export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}",
        "# Suggestions, check them against your cluster / XLA version before enabling:",
        "#   export NCCL_SOCKET_IFNAME=ib0            # the inter-node interface",
        "#   export NCCL_IB_HCA=mlx5                  # InfiniBand adapters",
        "#   export XLA_FLAGS=\"--xla_gpu_enable_latency_hiding_scheduler=true\"",
        "#   export XLA_PYTHON_CLIENT_PREALLOCATE=false  # if other processes share the GPUs",
    ]
    if extra:
        lines += ["", "# --env", extra.rstrip("\n")]
    lines += [
        "",
        'echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes x ' f'{a.gpus_per_node}'
        ' GPUs, coordinator $JAX_COORDINATOR_ADDRESS"',
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c " + shlex.quote(task),
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _parser()
    own, passthrough = _common.split_passthrough(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(own)
    missing = [f"--{n}" for n in ("config", "workdir") if not getattr(a, n)]
    if missing:
        p.error("missing required argument(s): " + ", ".join(missing))
    if a.nodes < 1 or a.gpus_per_node < 1:
        p.error("--nodes and --gpus-per-node must be >= 1")
    if a.dry_run and a.submit:
        p.error("--dry-run and --submit contradict each other")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", a.job_name):
        p.error(f"--job-name {a.job_name!r}: use letters, digits, '_', '.', '-'")
    a.env = _common.env_assignments(a.env, p)
    a.repo_dir = os.path.abspath(a.repo_dir)
    a.log_dir = os.path.abspath(a.log_dir or os.path.join(a.repo_dir, "slurm_logs"))
    script_path = os.path.abspath(a.script or os.path.join(a.log_dir, f"{a.job_name}.sbatch"))
    script = render_script(a, passthrough)
    sbatch = ["sbatch", script_path]
    if a.dry_run:
        print(f"# ---- {script_path} ----")
        print(script, end="")
        print("# ---- end ----")
        _common.show(sbatch)
        return 0
    os.makedirs(a.log_dir, exist_ok=True)
    os.makedirs(os.path.dirname(script_path), exist_ok=True)
    Path(script_path).write_text(script)
    os.chmod(script_path, 0o755)
    print(f"wrote {script_path}", file=sys.stderr)
    if not a.submit:
        print("submit it with:", file=sys.stderr)
        _common.show(sbatch)
        return 0
    return _common.run_commands([sbatch], dry_run=False, tools=["sbatch"])


if __name__ == "__main__":
    sys.exit(main())
