"""`cpu_devices.split_cpu`: a CPU-only command asks for one JAX device per core before JAX starts."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, xla_flags: str = "") -> str:
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_fresh_process_gets_the_devices_it_asks_for():
    out = _run("""
        from dediffusion_jax import cpu_devices
        asked = cpu_devices.split_cpu(3)
        import jax
        print(asked, jax.device_count())
    """)
    assert out == "3 3"


def test_xla_flags_set_by_the_user_win():
    out = _run("""
        from dediffusion_jax import cpu_devices
        asked = cpu_devices.split_cpu(3)
        import jax
        print(asked, jax.device_count())
    """, xla_flags="--xla_force_host_platform_device_count=4")
    assert out == "4 4"


def test_a_started_backend_keeps_its_devices_with_a_warning():
    out = _run("""
        import warnings
        import jax
        jax.numpy.zeros(1).block_until_ready()  # the backend starts with its one device
        from dediffusion_jax import cpu_devices
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kept = cpu_devices.split_cpu(2)
        print(kept, jax.device_count(), "has started" in str(caught[0].message))
    """)
    assert out == "1 1 True"
