"""The launchers (launch/*.py): --dry-run prints exactly what would run, passthrough overrides
survive every level of shell quoting, gcloud/sbatch are never invoked by a dry run, and missing
arguments fail with a clear message. gcloud, sbatch, srun and scontrol are replaced by small
recording fakes on PATH; nothing here needs a network, a TPU or a cluster."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"

# Overrides that would break naive quoting: spaces, both quote kinds, $, ;, globs, a leading dash.
NASTY = ["--config.name=it's a \"test\" $HOME; rm -rf /tmp/x *", "--config.lr", "-1e-4",
         "--config.list=[1, 2]"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", LAUNCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tpu_pod, slurm_gpu, local = _load("tpu_pod"), _load("slurm_gpu"), _load("local")


def _fake(bindir: Path, name: str, body: str = "") -> Path:
    """A fake tool that appends its argv (JSON) to bindir/calls.jsonl, then runs `body`."""
    path = bindir / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""\
        import json, os, sys
        with open({str(bindir / 'calls.jsonl')!r}, 'a') as f:
            f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')
        """) + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _calls(bindir: Path) -> list:
    f = bindir / "calls.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def _run(script: str, *args: str, path: str,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PATH"] = path
    return subprocess.run([sys.executable, str(LAUNCH / script), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def _commands(stdout: str) -> list:
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _option(argv: list, flag: str) -> str:
    return argv[argv.index(flag) + 1]


TPU = ["--tpu", "my-tpu", "--zone", "us-central2-b", "--project", "my-proj",
       "--config", "configs/paper.py:runlocal", "--workdir", "gs://bucket/run 1"]


# --------------------------------------------------------------------------------- shared parts

def test_split_passthrough_keeps_overrides_in_order():
    # The launchers split the command line with the trainer's own grammar (dediffusion_jax/cli_flags.py).
    from dediffusion_jax import cli_flags

    assert tpu_pod._common.split_passthrough is cli_flags.split_passthrough
    own, rest = tpu_pod._common.split_passthrough(
        ["--config", "c.py", "--config.a=1", "--zone", "z", "--config.b", "-2", "--dry-run",
         "--noconfig.c", "--config.d", "--", "--anything", "x y"])
    assert own == ["--config", "c.py", "--zone", "z", "--dry-run"]
    # `--config.b -2`: a value may start with one dash; `--config.d` followed by `--`: a bare bool.
    assert rest == ["--config.a=1", "--config.b", "-2", "--noconfig.c", "--config.d", "--anything", "x y"]
    assert tpu_pod._common.split_passthrough(["--config.a"]) == ([], ["--config.a"])


def test_jax_version_comes_from_constraints():
    pinned = [ln for ln in (REPO / "constraints.txt").read_text().splitlines()
              if ln.startswith("jax==")]
    assert tpu_pod._common.jax_version() == pinned[0].split("==")[1]


# ----------------------------------------------------------------------------------- TPU pod

def test_tpu_dry_run_prints_setup_and_run(capsys):
    assert tpu_pod.main([*TPU, "--setup", "--repo-url", "https://example.com/r.git",
                         "--branch", "dev", "--dry-run", *NASTY]) == 0
    cmds = _commands(capsys.readouterr().out)
    assert len(cmds) == 3  # clone, venv, run
    for c in cmds:
        assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
        assert _option(c, "--zone") == "us-central2-b" and _option(c, "--project") == "my-proj"
        assert "--worker=all" in c
    clone, venv, run = (_option(c, "--command") for c in cmds)
    assert "git clone https://example.com/r.git dediffusion_jax" in clone and "origin dev" in clone
    jax = tpu_pod._common.jax_version()
    assert "-r requirements.txt -c constraints.txt" in venv
    assert f"'jax[tpu]=={jax}' -c constraints.txt" in venv and "libtpu" in venv
    assert "nohup" in run and "logs/train_$(hostname).log" in run and "< /dev/null &" in run
    assert "--worker-env" in run  # per-host JAX_* from the TPU metadata


def test_tpu_passthrough_round_trips_through_both_shell_levels(capsys):
    tpu_pod.main([*TPU, "--dry-run", *NASTY])
    (run,) = _commands(capsys.readouterr().out)
    remote = shlex.split(_option(run, "--command"))
    train = remote[remote.index("nohup") + 1: remote.index(">")]
    assert train == [".venv/bin/python", "-m", "dediffusion_jax.train", "--config",
                     "configs/paper.py:runlocal", "--workdir", "gs://bucket/run 1", *NASTY]


@pytest.mark.parametrize("metadata_ok", [True, False])
def test_tpu_remote_command_runs_under_a_real_shell(tmp_path, capsys, metadata_ok):
    """Runs the exact --command string with bash in a fake TPU host checkout: the trainer gets
    the overrides byte for byte, the JAX_* env from --worker-env, and survives in background.
    If --worker-env fails (no metadata server), nothing is started and the command fails."""
    tpu_pod.main([*TPU, "--dry-run", "--env", "EXTRA=x y", *NASTY])
    (run,) = _commands(capsys.readouterr().out)
    home = tmp_path / "home"
    (home / "dediffusion_jax" / "launch").mkdir(parents=True)
    (home / "dediffusion_jax" / "launch" / "tpu_pod.py").write_text(
        "print('export JAX_COORDINATOR_ADDRESS=10.0.0.1:8476 JAX_NUM_PROCESSES=4 "
        "JAX_PROCESS_ID=2')\n" if metadata_ok else "raise SystemExit('no metadata server')\n")
    venv = home / "dediffusion_jax" / ".venv" / "bin"
    venv.mkdir(parents=True)
    out = tmp_path / "trainer.json"
    (venv / "python").write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                                 f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, "
                                 f"open({str(out)!r}, 'w'))\n")
    (venv / "python").chmod(0o755)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    proc = subprocess.run(["bash", "-c", _option(run, "--command")], cwd=home,
                          env={"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(home)},
                          capture_output=True, text=True, timeout=30)
    if not metadata_ok:
        assert proc.returncode != 0 and "no metadata server" in proc.stderr
        time.sleep(0.5)
        assert not out.exists()
        return
    assert proc.returncode == 0, proc.stderr
    assert "as process 2/4" in proc.stdout
    for _ in range(100):
        if out.exists() and out.stat().st_size:
            break
        time.sleep(0.1)
    got = json.loads(out.read_text())
    assert got["argv"] == ["-m", "dediffusion_jax.train", "--config", "configs/paper.py:runlocal",
                           "--workdir", "gs://bucket/run 1", *NASTY]
    assert got["env"]["JAX_PROCESS_ID"] == "2" and got["env"]["JAX_NUM_PROCESSES"] == "4"
    assert got["env"]["EXTRA"] == "x y"
    assert (home / "dediffusion_jax" / "logs" / "train.pid").read_text().strip().isdigit()
    assert list((home / "dediffusion_jax" / "logs").glob("train_*.log"))


def test_tpu_worker_env_from_metadata_both_formats():
    old = "t1v-n-0:0:10.0.0.5,t1v-n-1:1:10.0.0.6,t1v-n-2:2:10.0.0.7,t1v-n-3:3:10.0.0.8"
    assert tpu_pod.worker_env_from_metadata("3", old, 8476) == {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.5:8476", "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3"}
    new = tpu_pod.worker_env_from_metadata("0", "host-a,host-b", 1234)
    assert new["JAX_COORDINATOR_ADDRESS"] == "host-a:1234" and new["JAX_NUM_PROCESSES"] == "2"
    with pytest.raises(ValueError, match="out of range"):
        tpu_pod.worker_env_from_metadata("2", "host-a,host-b", 1234)


def test_tpu_sync_dir_dry_run_tars_and_scps(tmp_path, capsys):
    tpu_pod.main([*TPU, "--setup-only", "--sync-dir", str(tmp_path), "--dry-run"])
    cmds = _commands(capsys.readouterr().out)
    assert [c[0] for c in cmds] == ["tar", "gcloud", "gcloud", "gcloud"]
    assert "--exclude=./.venv" in cmds[0] and cmds[0][-3:] == ["-C", str(tmp_path), "."]
    assert cmds[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert "--worker=all" in cmds[1]
    assert "nohup" not in " ".join(cmds[-1])  # --setup-only starts nothing


def test_tpu_dry_run_never_calls_gcloud(tmp_path):
    _fake(tmp_path, "gcloud")
    for path in (str(tmp_path), str(tmp_path / "empty")):  # a recording fake / no gcloud at all
        r = _run("tpu_pod.py", *TPU, "--setup", "--repo-url", "u", "--create",
                 "--accelerator-type", "v4-64", "--dry-run", *NASTY, path=path)
        assert r.returncode == 0, r.stderr
        assert len(_commands(r.stdout)) == 4
    assert _calls(tmp_path) == []


def test_tpu_executes_exactly_the_dry_run_commands(tmp_path):
    _fake(tmp_path, "gcloud")
    args = [*TPU, "--setup", "--repo-url", "u", *NASTY]
    dry = _run("tpu_pod.py", *args, "--dry-run", path=str(tmp_path))
    real = _run("tpu_pod.py", *args, path=str(tmp_path))
    assert real.returncode == 0, real.stderr
    assert _calls(tmp_path) == _commands(dry.stdout)


def test_tpu_without_gcloud_fails_clearly(tmp_path):
    r = _run("tpu_pod.py", *TPU, path=str(tmp_path))
    assert r.returncode != 0 and "`gcloud` not found on PATH" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--config", "c", "--workdir", "gs://b"], "--tpu, --project"),
    (["--tpu", "t", "--zone", "z", "--project", "p"], "--config, --workdir"),
    (["--tpu", "t", "--zone", "z", "--project", "p", "--config", "c", "--workdir", "/local"],
     "must be a gs:// path"),
    ([*TPU, "--setup"], "--setup needs the code"),
    ([*TPU, "--create"], "--create needs --accelerator-type"),
    ([*TPU, "--env", "NOT A VAR"], "KEY=VALUE"),
])
def test_tpu_rejects_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        tpu_pod.main([*args, "--dry-run"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------- SLURM

SLURM = ["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "1:00:00",
         "--config", "configs/paper.py", "--workdir", "/shared/run 1"]


def test_slurm_dry_run_prints_script_and_sbatch(tmp_path, capsys):
    script_path = tmp_path / "job.sbatch"
    assert slurm_gpu.main([*SLURM, "--script", str(script_path), "--dry-run", *NASTY]) == 0
    out = capsys.readouterr().out
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00",
                 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1',
                 "export JAX_NUM_PROCESSES=$SLURM_NTASKS", "XLA_PYTHON_CLIENT_MEM_FRACTION=",
                 "NCCL_DEBUG", "srun --kill-on-bad-exit=1"]:
        assert line in out
    assert out.rstrip().splitlines()[-1] == shlex.join(["sbatch", str(script_path)])
    assert not script_path.exists()  # a dry run writes nothing
    srun = shlex.split(next(ln for ln in out.splitlines() if ln.startswith("srun ")))
    inner = shlex.split(srun[-1])
    assert inner[:2] == ["export", "JAX_PROCESS_ID=$SLURM_PROCID"]
    assert inner[inner.index("exec") + 2:] == ["-m", "dediffusion_jax.train", "--config",
                                               "configs/paper.py", "--workdir", "/shared/run 1",
                                               *NASTY]


def test_slurm_script_runs_with_fake_srun(tmp_path):
    """Executes the written script with fake scontrol/srun (2 tasks) and a fake python: each task
    gets the coordinator = first node, its own process id and the exact overrides."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake(bindir, "scontrol", "print('node-a\\nnode-b')\n")
    _fake(bindir, "srun", """\
        import subprocess
        args = sys.argv[1:]
        while args[0].startswith('--'):
            args = args[1:]
        for i in range(2):
            subprocess.run(args, env={**os.environ, 'SLURM_PROCID': str(i)}, check=True)
        """)
    out = tmp_path / "tasks.jsonl"
    fake_py = tmp_path / "python"
    fake_py.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                       "keys = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', "
                       "'JAX_PROCESS_ID')\n"
                       f"open({str(out)!r}, 'a').write(json.dumps([sys.argv[1:], "
                       f"[os.environ[k] for k in keys]]) + '\\n')\n")
    fake_py.chmod(0o755)
    script = tmp_path / "job.sbatch"
    r = _run("slurm_gpu.py", *SLURM, "--python", str(fake_py), "--script", str(script),
             "--log-dir", str(tmp_path / "logs"), *NASTY, path=str(bindir))
    assert r.returncode == 0, r.stderr
    assert _calls(bindir) == []  # written, not submitted
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_JOB_ID": "1234"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    tasks = [json.loads(line) for line in out.read_text().splitlines()]
    port = 1234 % 4096 + 61440
    assert [t[1] for t in tasks] == [[f"node-a:{port}", "2", "0"], [f"node-a:{port}", "2", "1"]]
    for argv, _ in tasks:
        assert argv == ["-m", "dediffusion_jax.train", "--config", "configs/paper.py",
                        "--workdir", "/shared/run 1", *NASTY]


def test_slurm_submit_calls_sbatch_and_dry_run_does_not(tmp_path):
    _fake(tmp_path, "sbatch", "print('Submitted batch job 42')\n")
    script = tmp_path / "s" / "job.sbatch"
    dry = _run("slurm_gpu.py", *SLURM, "--script", str(script), "--dry-run", path=str(tmp_path))
    assert dry.returncode == 0 and _calls(tmp_path) == [] and not script.exists()
    r = _run("slurm_gpu.py", *SLURM, "--script", str(script), "--log-dir", str(tmp_path / "l"),
             "--submit", path=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert _calls(tmp_path) == [["sbatch", str(script)]] and script.exists()
    assert (tmp_path / "l").is_dir()  # SLURM needs the --output folder to exist


def test_slurm_submit_without_sbatch_fails_clearly(tmp_path):
    r = _run("slurm_gpu.py", *SLURM, "--script", str(tmp_path / "j.sbatch"),
             "--log-dir", str(tmp_path), "--submit", path=str(tmp_path / "empty"))
    assert r.returncode != 0 and "`sbatch` not found on PATH" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--workdir", "w"], "--config"),
    (["--config", "c"], "--workdir"),
    (["--config", "c", "--workdir", "w", "--nodes", "0"], "must be >= 1"),
    (["--config", "c", "--workdir", "w", "--submit"], "contradict"),
])
def test_slurm_rejects_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        slurm_gpu.main([*args, "--dry-run"])
    assert e.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------- local

def test_local_dry_run_single_process(capsys):
    assert local.main(["--config", "projects/miniworld/configs/world.py", "--workdir", "w d", "--platform", "gpu",
                       "--python", "py", "--dry-run", *NASTY]) == 0
    (cmd,) = _commands(capsys.readouterr().out)
    assert cmd == ["env", "JAX_PLATFORMS=cuda", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90", "py", "-m",
                   "dediffusion_jax.train", "--config", "projects/miniworld/configs/world.py", "--workdir", "w d",
                   *NASTY]


def test_local_dry_run_multi_process(capsys):
    local.main(["--config", "c", "--workdir", "w", "--processes", "3", "--devices-per-process",
                "2", "--port", "4321", "--python", "py", "--dry-run", *NASTY])
    cmds = _commands(capsys.readouterr().out)
    assert len(cmds) == 3
    for i, cmd in enumerate(cmds):
        env = dict(x.split("=", 1) for x in cmd[1:cmd.index("py")])
        assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4321"
        assert env["JAX_NUM_PROCESSES"] == "3" and env["JAX_PROCESS_ID"] == str(i)
        assert env["JAX_PLATFORMS"] == "cpu"
        assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"]
        assert cmd[cmd.index("py"):] == ["py", "-m", "dediffusion_jax.train", "--config", "c",
                                         "--workdir", "w", *NASTY]


@pytest.mark.parametrize("args, message", [
    (["--workdir", "w"], "--config"),
    (["--config", "c", "--workdir", "w", "--processes", "2", "--platform", "gpu"], "CPU"),
    (["--config", "c", "--workdir", "w", "--processes", "0"], "must be >= 1"),
])
def test_local_rejects_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        local.main([*args, "--dry-run"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def _probe(tmp_path: Path, body: str) -> dict:
    (tmp_path / "probe_mod.py").write_text(textwrap.dedent(body))
    return {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}


def test_local_stops_the_others_when_one_process_fails(tmp_path, monkeypatch):
    for k, v in _probe(tmp_path, """\
            import os, sys, time
            if os.environ['JAX_PROCESS_ID'] == '1':
                sys.exit(3)
            time.sleep(60)
            """).items():
        monkeypatch.setenv(k, v)
    t0 = time.time()
    rc = local.main(["--module", "probe_mod", "--python", sys.executable, "--config", "c",
                     "--workdir", str(tmp_path / "wd"), "--processes", "2"])
    assert rc == 3 and time.time() - t0 < 30
    assert (tmp_path / "wd" / "launch_logs" / "process_1.log").exists()


@pytest.mark.multiprocess
def test_local_processes_form_one_jax_distributed_job(tmp_path):
    """2 processes x 2 CPU devices through the real initialize_distributed: one 4-device job."""
    env = _probe(tmp_path, """\
        import argparse, json, os
        p = argparse.ArgumentParser(); p.add_argument('--config'); p.add_argument('--workdir')
        a, rest = p.parse_known_args()
        from dediffusion_jax.parallel.multihost import initialize_distributed
        started = initialize_distributed()
        import jax, jax.numpy as jnp
        from jax.experimental import multihost_utils
        total = int(multihost_utils.process_allgather(jnp.array([jax.process_index() + 1])).sum())
        with open(os.path.join(a.workdir, f'p{jax.process_index()}.json'), 'w') as f:
            json.dump([started, jax.process_count(), jax.device_count(), total, rest], f)
        """)
    wd = tmp_path / "wd"
    wd.mkdir()
    r = subprocess.run([sys.executable, str(LAUNCH / "local.py"), "--module", "probe_mod",
                        "--python", sys.executable, "--config", "c", "--workdir", str(wd),
                        "--processes", "2", "--devices-per-process", "2", NASTY[0]],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for i in range(2):
        assert json.loads((wd / f"p{i}.json").read_text()) == [True, 2, 4, 3, [NASTY[0]]]
