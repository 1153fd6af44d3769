"""One XLA CPU device per core: how a CPU-only run uses all of its cores.

Why: XLA:CPU runs one device's program with intra-op threads, which this UNet's many small and
memory-bound ops do not keep busy; split into n devices, a data-parallel step runs each device's
shard of the batch on its own thread. On the 2-core machine the world train step at batch 32 takes
310 ms on 2 devices against 486 ms on one, and the world UNet's forward and its forward + text
gradient both take about 0.6x of one device's time (bench/README.md, "Cores as devices"). The count must be
set before JAX starts its CPU backend, so a command calls this first. Accelerator backends are
unaffected: it sets the number of CPU devices only.
"""

from __future__ import annotations

import os
import warnings

_FORCED = "xla_force_host_platform_device_count"


def split_cpu(devices: int) -> int:
    """Ask JAX for `devices` CPU devices (0: one per core); returns the count asked for, or the
    count already fixed by XLA_FLAGS. Warns and changes nothing when the CPU backend has started."""
    import jax

    if _FORCED in os.environ.get("XLA_FLAGS", ""):
        return int(os.environ["XLA_FLAGS"].split(f"{_FORCED}=")[1].split()[0])
    devices = devices or os.cpu_count() or 1
    try:
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError:  # the backend started already (an interactive session, a test process)
        warnings.warn(f"JAX's CPU backend has started: it keeps its {jax.local_device_count('cpu')} "
                      f"device(s) instead of {devices}", stacklevel=2)
        return jax.local_device_count("cpu")
    return devices
