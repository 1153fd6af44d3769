"""Train on a Cloud TPU VM (single host or pod slice) through `gcloud compute tpus tpu-vm ssh`.

    python launch/tpu_pod.py --tpu NAME --zone Z --project P --config configs/paper.py \\
        --workdir gs://BUCKET/run1 [--config.key=value ...] \\
        [--setup (--repo-url URL [--branch B] | --sync-dir DIR)] [--setup-only] [--stop] [--dry-run]

Every host of the slice runs the same command (`--worker=all`): one training process per host,
started with nohup in the background so a dropped ssh connection does not kill it, logging to
REMOTE_DIR/logs/train_<hostname>.log. Each process gets JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID computed on the host from the TPU VM metadata (worker 0 is the
coordinator), so `initialize_distributed()` starts jax.distributed explicitly.

--setup first copies the code (git clone of --repo-url/--branch, or a tarball of the local
checkout --sync-dir), then creates REMOTE_DIR/.venv and installs requirements.txt with
constraints.txt plus `jax[tpu]==<the jax pinned in constraints.txt>`: the TPU variant of the same
jax release, which pulls the libtpu build that release requires.

--dry-run prints every command, one per line, and runs nothing. `--worker-env` is the helper run on
each TPU host (it prints the `export JAX_...` line from the metadata server).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

COORDINATOR_PORT = 8476  # the port JAX itself uses for Cloud TPU
TARBALL = "dediffusion_jax-src.tgz"
# Top-level build/run outputs (anchored: `tar -C DIR .` names members ./x) and caches anywhere.
SYNC_EXCLUDES = ("./.venv", "./.git", "./workdirs", "./.pytest_cache", "./.cache", "./out",
                 "__pycache__", "*.egg-info")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch/tpu_pod.py", allow_abbrev=False,
        description="Train dediffusion_jax on a Cloud TPU VM pod slice via gcloud.",
        epilog="Any --config.key=value (or --config.key value, or anything after --) is passed "
               "to the trainer unchanged.")
    p.add_argument("--tpu", help="TPU VM name (gcloud compute tpus tpu-vm create NAME ...)")
    p.add_argument("--zone", help="its zone, e.g. us-central2-b")
    p.add_argument("--project", help="its GCP project")
    p.add_argument("--accelerator-type", default=None,
                   help="e.g. v4-64; needed with --create (an existing TPU VM has its type)")
    p.add_argument("--create", action="store_true",
                   help="create the TPU VM first (gcloud compute tpus tpu-vm create)")
    p.add_argument("--runtime-version", default="tpu-ubuntu2204-base",
                   help="TPU VM software version for --create (default %(default)s)")
    p.add_argument("--config", help="experiment config, e.g. configs/paper.py or configs/x.py:arg")
    p.add_argument("--workdir", help="gs://BUCKET/PATH: checkpoints and metrics (must be GCS: "
                                     "all hosts write to the same place)")
    p.add_argument("--remote-dir", default="dediffusion_jax",
                   help="checkout location on each host, relative to $HOME (default %(default)s)")
    p.add_argument("--remote-python", default="python3",
                   help="interpreter that creates the venv on the hosts (needs >= 3.11; "
                        "default %(default)s)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--repo-url", help="git URL the hosts clone (with --setup)")
    src.add_argument("--sync-dir", help="local checkout to copy to the hosts (with --setup)")
    p.add_argument("--branch", default="main", help="branch/tag/commit for --repo-url")
    p.add_argument("--setup", action="store_true", help="copy the code and install the venv first")
    p.add_argument("--setup-only", action="store_true", help="--setup without starting training")
    p.add_argument("--stop", action="store_true",
                   help="stop the training processes this launcher started (pid files) and exit")
    p.add_argument("--jax-spec", default=None,
                   help="pip spec for the TPU jax (default jax[tpu]==<pinned jax version>)")
    p.add_argument("--port", type=int, default=COORDINATOR_PORT,
                   help="jax.distributed coordinator port on worker 0 (default %(default)s)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for the training processes (repeatable)")
    p.add_argument("--module", default=_common.TRAIN_MODULE, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print every command; run nothing")
    p.add_argument("--worker-env", action="store_true",
                   help="(runs on a TPU host) print `export JAX_...` for this host and exit")
    return p


# ----------------------------------------------------------------------------- on the TPU host

def worker_env_from_metadata(worker_number: str, endpoints: str, port: int) -> dict:
    """JAX_* variables for one host from the TPU VM metadata values.

    `endpoints` is the `worker-network-endpoints` attribute: comma-separated, each entry either a
    hostname/IP (new format) or `name:id:ip` (old format); entry 0 is worker 0, the coordinator.
    """
    entries = [e.strip() for e in endpoints.split(",") if e.strip()]
    if not entries:
        raise ValueError("empty worker-network-endpoints metadata")
    first = entries[0].split(":")[-1] if entries[0].count(":") >= 2 else entries[0]
    worker = int(worker_number)
    if not 0 <= worker < len(entries):
        raise ValueError(f"worker {worker} out of range for {len(entries)} workers")
    return {"JAX_COORDINATOR_ADDRESS": f"{first}:{port}",
            "JAX_NUM_PROCESSES": str(len(entries)),
            "JAX_PROCESS_ID": str(worker)}


def _metadata(key: str) -> str:
    url = f"http://metadata.google.internal/computeMetadata/v1/instance/attributes/{key}"
    req = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (fixed GCE metadata URL)
        return resp.read().decode()


def _print_worker_env(port: int) -> int:
    env = worker_env_from_metadata(_metadata("agent-worker-number"),
                                   _metadata("worker-network-endpoints"), port)
    print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    return 0


# ----------------------------------------------------------------------------- on this machine

def _gcloud_ssh(a: argparse.Namespace, remote: str) -> List[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", a.tpu, "--zone", a.zone,
            "--project", a.project, "--worker=all", "--command", remote]


def setup_commands(a: argparse.Namespace) -> List[List[str]]:
    """Code onto every host, then the venv with the pinned stack and the TPU jax of that version."""
    d = shlex.quote(a.remote_dir)
    cmds: List[List[str]] = []
    if a.sync_dir:
        local_tgz = f"/tmp/{TARBALL}"
        excludes = [f"--exclude={x}" for x in SYNC_EXCLUDES]
        cmds.append(["tar", "-czf", local_tgz, *excludes, "-C", str(Path(a.sync_dir).resolve()),
                     "."])
        cmds.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", local_tgz,
                     f"{a.tpu}:{TARBALL}", "--zone", a.zone, "--project", a.project,
                     "--worker=all"])
        cmds.append(_gcloud_ssh(a, f"mkdir -p {d} && tar -xzf {TARBALL} -C {d} && rm -f {TARBALL}"))
    else:
        url, br = shlex.quote(a.repo_url), shlex.quote(a.branch)
        cmds.append(_gcloud_ssh(
            a, f"{{ test -d {d}/.git || git clone {url} {d}; }} && git -C {d} fetch origin {br} "
               f"&& git -C {d} checkout --force FETCH_HEAD"))
    jax_spec = a.jax_spec or f"jax[tpu]=={_common.jax_version()}"
    pip = ".venv/bin/pip install -q --disable-pip-version-check"
    check = ('import jax, importlib.metadata as m; '
             'print("jax", jax.__version__, "libtpu", m.version("libtpu"))')
    cmds.append(_gcloud_ssh(
        a, f"cd {d} && {shlex.quote(a.remote_python)} -m venv .venv && {pip} --upgrade pip "
           f"&& {pip} -r requirements.txt -c constraints.txt "
           f"&& {pip} {shlex.quote(jax_spec)} -c constraints.txt "
           f"&& {pip} --no-deps -e . && .venv/bin/python -c {shlex.quote(check)}"))
    return cmds


def run_command(a: argparse.Namespace, passthrough: Sequence[str]) -> List[str]:
    """One ssh to all hosts: per-host JAX_* env from metadata, then nohup training in background."""
    d = shlex.quote(a.remote_dir)
    train = shlex.join(_common.train_argv(".venv/bin/python", a.config, a.workdir, passthrough,
                                          a.module))
    env = _common.export_prefix(a.env)
    log = "logs/train_$(hostname).log"  # $(hostname) expands on each host: one log per worker
    remote = (
        f"cd {d} && mkdir -p logs && "
        # (assigned first: `eval "$(cmd)"` would succeed even when cmd fails)
        f"JAX_ENV=$(python3 launch/tpu_pod.py --worker-env --port {int(a.port)}) && "
        f"eval \"$JAX_ENV\" && {env}"
        f"{{ nohup {train} > {log} 2>&1 < /dev/null & echo $! > logs/train.pid; "
        f"echo \"started pid $! on $(hostname) as process $JAX_PROCESS_ID/$JAX_NUM_PROCESSES, "
        f"log: $PWD/{log}\"; }}")
    return _gcloud_ssh(a, remote)


def create_command(a: argparse.Namespace) -> List[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "create", a.tpu, "--zone", a.zone,
            "--project", a.project, "--accelerator-type", a.accelerator_type,
            "--version", a.runtime_version]


def stop_command(a: argparse.Namespace) -> List[str]:
    d = shlex.quote(a.remote_dir)
    return _gcloud_ssh(a, f"cd {d} && test -f logs/train.pid && kill $(cat logs/train.pid) "
                          f"&& rm -f logs/train.pid && echo \"stopped on $(hostname)\"")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _parser()
    own, passthrough = _common.split_passthrough(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(own)
    if a.worker_env:
        return _print_worker_env(a.port)
    missing = [f"--{n}" for n in ("tpu", "zone", "project") if not getattr(a, n)]
    run = not (a.setup_only or a.stop)
    if run:
        missing += [f"--{n}" for n in ("config", "workdir") if not getattr(a, n)]
    if missing:
        p.error("missing required argument(s): " + ", ".join(missing))
    if a.setup_only:
        a.setup = True
    if a.setup and not (a.repo_url or a.sync_dir):
        p.error("--setup needs the code: --repo-url URL [--branch B] or --sync-dir DIR")
    if a.sync_dir and not Path(a.sync_dir).is_dir():
        p.error(f"--sync-dir {a.sync_dir} is not a directory")
    if run and not _common.is_gcs(a.workdir):
        p.error(f"--workdir must be a gs:// path (every host writes there), got {a.workdir!r}")
    a.env = _common.env_assignments(a.env, p)

    if a.create and not a.accelerator_type:
        p.error("--create needs --accelerator-type, e.g. v4-64")
    if a.stop:
        cmds = [stop_command(a)]
    else:
        cmds = [create_command(a)] if a.create else []
        cmds += setup_commands(a) if a.setup else []
        if run:
            cmds.append(run_command(a, passthrough))
    if a.dry_run and a.accelerator_type:
        print(f"# TPU {a.tpu} ({a.accelerator_type}), zone {a.zone}, project {a.project}")
    tools = ["gcloud"] + (["tar"] if a.setup and a.sync_dir else [])
    rc = _common.run_commands(cmds, a.dry_run, tools)
    if rc == 0 and run and not a.dry_run:
        follow = _gcloud_ssh(a, f"tail -f {shlex.quote(a.remote_dir)}/logs/train_*.log")
        follow[follow.index("--worker=all")] = "--worker=0"
        print(f"training started on every host of {a.tpu}; follow worker 0 with\n  "
              + shlex.join(follow), file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
