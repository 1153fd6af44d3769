"""Every command explains itself (issue 22): `--help` exits 0 and prints its usage quickly, and the light
ones import no jax; `train --help` lists the config schema, and `--config FILE --help` that file's
arguments and values."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAPER = "configs/paper.py"
WORLD = "projects/miniworld/configs/world.py"
SECONDS = 15  # "a few seconds" on a loaded 2-core machine; a light --help takes well under 1 s here

# (argv after the interpreter, whether --help must not import jax).
ENTRY_POINTS = [
    (["-m", "dediffusion_jax.train", "--help"], True),
    (["-m", "dediffusion_jax.train", "--helpfull"], True),
    (["-m", "dediffusion_jax.train", "--config", PAPER, "--help"], True),
    (["-m", "dediffusion_jax.train", "--config", f"{WORLD}:tokens=6", "--help"], True),
    (["-m", "dediffusion_jax.generate", "--help"], True),
    (["-m", "projects.miniworld.demo", "--help"], True),
    (["projects/miniworld/bench/encoder_sweep.py", "--help"], True),
    (["projects/miniworld/bench/step_breakdown.py", "--help"], True),
    (["bench/throughput.py", "--help"], True),
    (["bench/vocab_head.py", "--help"], True),
    (["bench/unet_cpu.py", "--help"], True),
    (["bench/unet_profile.py", "--help"], True),
    (["bench/unet_ab.py", "--help"], True),
    (["launch/local.py", "--help"], True),
    (["launch/slurm_gpu.py", "--help"], True),
    (["launch/tpu_pod.py", "--help"], True),
    (["-m", "projects.miniworld.tfds_builder", "--help"], True),
    (["-m", "projects.miniworld.probe", "--help"], True),
    (["-m", "dediffusion_jax.evaluation.convert_inception", "--help"], True),
    (["-m", "dediffusion_jax.evaluate", "--help"], True),
    (["-m", "dediffusion_jax.encode", "--help"], True),
    (["-m", "dediffusion_jax.encode_latents", "--help"], True),
    (["-m", "projects.miniworld.pretrain_decoder", "--help"], True),
    (["-m", "projects.miniworld.pretrain_backbone", "--help"], True),
    (["-m", "projects.miniworld.classifier", "--help"], True),
    (["-m", "projects.miniworld.pretrain_vae", "--help"], True),
    (["-m", "projects.miniworld.third_party", "--help"], True),
    (["-m", "bench.sampling", "--help"], True),
    (["-m", "projects.miniworld.ablations", "--help"], True),
    (["-m", "projects.miniworld.object_count", "--help"], True),
    (["-m", "dediffusion_jax.fewshot", "--help"], True),
    (["-m", "projects.miniworld.fewshot_eval", "--help"], True),
    (["-m", "projects.miniworld.naming_probe", "--help"], True),
    (["-m", "projects.miniworld.recall_trial", "--help"], True),
]


def run_help(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    return proc, time.perf_counter() - start


def imports_jax(importtime_stderr: str) -> bool:
    return re.search(r"\|\s+jax$", importtime_stderr, flags=re.M) is not None


def test_every_entry_point_is_listed():
    listed = {a[1] if a[0] == "-m" else a[0] for a, _ in ENTRY_POINTS}
    benches = {str(p.relative_to(REPO)) for p in (REPO / "projects/miniworld/bench").glob("*.py")
               if p.name != "__init__.py"} | {str(p.relative_to(REPO)) for p in (REPO / "bench").glob("*.py")
                                         if p.name != "__init__.py"}
    launchers = {str(p.relative_to(REPO)) for p in (REPO / "launch").glob("*.py") if p.name != "_common.py"}
    assert benches | launchers <= listed


@pytest.mark.parametrize("argv, light", ENTRY_POINTS, ids=[" ".join(a) for a, _ in ENTRY_POINTS])
def test_help_exits_0_with_usage(argv, light):
    proc, seconds = run_help(*argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower(), proc.stdout[:500]
    assert seconds < SECONDS, seconds
    if light:
        assert not imports_jax(proc.stderr), f"{argv} imported jax for --help"


def test_train_help_lists_every_config_field_with_type_default_and_meaning():
    from dediffusion_jax import config as config_lib

    proc, _ = run_help("-m", "dediffusion_jax.train", "--help")
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ")}
    for key, doc in config_lib.FIELD_DOCS.items():
        assert key in lines and doc in lines[key], key
    assert re.search(r"encoder\.num_queries\s+int\s+75\s", lines["encoder.num_queries"])
    assert re.search(r"loss\.timestep_range\s+tuple\[float\]\s+\(0\.0, 1\.0\)", lines["loss.timestep_range"])


def test_train_help_with_the_paper_config_shows_its_75_tokens_and_arguments():
    proc, _ = run_help("-m", "dediffusion_jax.train", "--config", PAPER, "--help")
    out = proc.stdout
    assert proc.returncode == 0
    assert "The paper's setting" in out                                # the file's docstring
    assert re.search(r"^  runlocal\s+bool\s+default False$", out, flags=re.M)  # its typed arguments
    assert re.search(r"^  batch_size\s+2048\s+\(default 32\)$", out, flags=re.M)  # what it changes
    assert re.search(r"^  encoder\.num_queries\s+int\s+75\s", out, flags=re.M)


def test_train_help_with_a_world_argument_shows_its_values():
    proc, _ = run_help("-m", "dediffusion_jax.train", "--config", f"{WORLD}:tokens=6,relax=hard", "--help")
    out = proc.stdout
    assert re.search(r"^  relax\s+soft\|hard\s+default 'soft'$", out, flags=re.M)
    assert re.search(r"^  encoder\.num_queries\s+6\s+\(default 75\)$", out, flags=re.M)
    assert re.search(r"^  quantizer\.hard\s+bool\s+True\s", out, flags=re.M)


def test_help_with_a_bad_config_argument_is_one_error():
    proc, _ = run_help("-m", "dediffusion_jax.train", "--config", f"{WORLD}:tokenz=8", "--help")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith(f"error: {WORLD}:tokenz=8: unknown config argument 'tokenz'")
