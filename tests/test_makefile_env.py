"""What every `make` target runs under: huge pages for glibc, and tcmalloc preloaded where installed.

The allocator settings are read at process start, so the Makefile exports them (bench/README.md,
"Huge pages" and "The allocator"); these tests read the environment a recipe sees, with a one-line
extra makefile, for a tcmalloc that is present, one that is absent, and one switched off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRINT_ENV = 'print-env:\n\t@echo "$$LD_PRELOAD|$$GLIBC_TUNABLES|$$TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"\n'

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def recipe_env(*make_args: str, env: dict[str, str] | None = None) -> tuple[str, str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "TCMALLOC", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD")}
    out = subprocess.run(["make", "-s", "-f", "Makefile", "-f", "-", "print-env", *make_args], cwd=ROOT,
                         input=PRINT_ENV, capture_output=True, text=True, env={**base, **(env or {})}, check=True)
    preload, tunables, threshold = out.stdout.strip().split("|")
    return preload, tunables, threshold


def test_a_found_tcmalloc_is_preloaded_before_any_preload_already_set(tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    preload, tunables, threshold = recipe_env(f"TCMALLOC={lib}", env={"LD_PRELOAD": "/opt/other.so"})
    assert preload.split() == [str(lib), "/opt/other.so"]
    assert tunables == "glibc.malloc.hugetlb=1"
    assert int(threshold) >= 1 << 36  # no stderr line for every large CPU buffer


def test_tcmalloc_switched_off_leaves_the_environment_as_it_was():
    preload, tunables, threshold = recipe_env("TCMALLOC=", env={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert preload == "" and threshold == ""
    assert tunables == "glibc.malloc.hugetlb=0"  # an existing setting wins


def test_the_default_search_finds_only_a_library_that_exists():
    preload, _, _ = recipe_env()
    assert all(Path(p).is_file() for p in preload.split())
    assert all(Path(p).name == "libtcmalloc_minimal.so.4" for p in preload.split())
