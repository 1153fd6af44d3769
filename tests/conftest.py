"""Test-wide settings: offline, 8 fake CPU devices, a persistent compilation cache.

Set before JAX is imported anywhere so that every test sees the same 8-device CPU platform: sharded
tests build meshes over it, single-device tests simply use `jax.devices()[0]`.
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402

_CACHE = Path(os.environ.get("DEDIFFUSION_JAX_CACHE", Path.home() / ".cache" / "dediffusion_jax"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE / "jax_compilation_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
