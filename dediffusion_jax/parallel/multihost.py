"""Multi-host helpers: jax.distributed start-up, global batch assembly, barriers.

Every process runs the same program. Each one reads a disjoint part of the data (the grain
pipeline's strided shard, data/pipeline.py) and contributes it to one global jax.Array
(`host_local_batch_to_global`); the jitted train step then sees the global batch. With one process
all of this reduces to plain single-host code.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from dediffusion_jax.parallel.mesh import batch_sharding

log = logging.getLogger(__name__)


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def _cluster_env_is_multiprocess() -> bool:
    """True under a launcher JAX can auto-detect (SLURM, Open MPI, multi-host TPU) with >1 process."""
    if (_env_int("SLURM_NTASKS", "SLURM_NPROCS") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Starts jax.distributed when there is more than one process; returns whether it did.

    Sources, in order: the arguments; JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID; a cluster JAX detects by itself (SLURM, Open MPI, multi-host Cloud TPU).
    One process (nothing set) is a no-op, so laptops and tests need no special casing. CPU
    collectives across processes use gloo. Must run before anything touches jax devices.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    explicit = coordinator_address is not None
    if explicit and num_processes == 1:
        return False
    if not explicit and not _cluster_env_is_multiprocess():
        log.info("single process: jax.distributed not started")
        return False
    # Harmless off-CPU; without it CPU collectives across processes fail.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True


def host_local_batch_to_global(mesh: Mesh, local_batch: Any,
                               sharding: NamedSharding | None = None) -> Any:
    """Assembles a global jax.Array per leaf from this process's numpy rows.

    Each process passes its own [B_local, ...] arrays (B_local = global batch / process count);
    the result is [B_global, ...] sharded by `sharding` (default: batch over data x fsdp), with
    each process's rows on its own devices and no cross-host copy.
    """
    sharding = batch_sharding(mesh) if sharding is None else sharding
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def sync_global_devices(name: str) -> None:
    """Barrier across all processes (e.g. before and after writing a checkpoint)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
