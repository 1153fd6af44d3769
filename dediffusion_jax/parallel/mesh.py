"""Device mesh from a config: axes (data, fsdp, tensor), one of them auto-filled.

The same three axes exist on every machine, from one CPU (1x1x1) to a pod, so sharding rules and the
train step never special-case the hardware:
- ``data``: pure data parallelism (params replicated across it); on multi-slice TPU it spans DCN;
- ``fsdp``: data parallelism whose params/optimizer state are ALSO sharded across it (ZeRO-3 style);
- ``tensor``: tensor (model) parallelism over mlp / heads / vocab dims.
The batch is split over ``data x fsdp``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

AxesLike = Mapping[str, int] | Sequence[tuple[str, int]]


def resolve_mesh_shape(axes: AxesLike, num_devices: int) -> dict[str, int]:
    """Returns {data, fsdp, tensor} sizes (in that order) with the single -1 filled in.

    Missing axes get size 1. Raises ValueError, naming the numbers, when the sizes cannot cover
    exactly `num_devices` devices.
    """
    items = list(axes.items()) if isinstance(axes, Mapping) else [tuple(a) for a in axes]
    sizes: dict[str, int] = {}
    for name, size in items:
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r}; expected a subset of {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} given twice")
        size = int(size)
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name!r} has size {size}; use a positive size or -1")
        sizes[name] = size
    auto = [n for n, s in sizes.items() if s == -1]
    if len(auto) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (auto), got {auto} in {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if auto:
        if num_devices % fixed:
            raise ValueError(
                f"cannot auto-fill mesh axis {auto[0]!r}: the other axes multiply to {fixed}, "
                f"which does not divide the device count {num_devices} (axes {sizes})")
        sizes[auto[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh axes {sizes} multiply to {fixed} but there are {num_devices} devices; "
            f"make the product equal {num_devices} or set one axis to -1")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def _device_array(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
    """Arranges devices for `shape`: ICI-friendly on TPU, data axis over DCN on multi-slice."""
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1 and shape[0] % num_slices == 0:
        # Multi-slice: only the pure-data axis crosses the slow inter-slice network.
        per_slice = (shape[0] // num_slices,) + tuple(shape[1:])
        dcn = (num_slices,) + (1,) * (len(shape) - 1)
        try:
            return mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices)
        except Exception as e:  # noqa: BLE001 - fall back to the plain layout, say why.
            log.warning("hybrid (multi-slice) device mesh failed (%s); using a plain layout", e)
    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except Exception as e:  # noqa: BLE001 - unusual topologies: fall back to device order.
        log.debug("create_device_mesh failed (%s); reshaping devices in order", e)
        return np.asarray(devices, dtype=object).reshape(shape)


def make_mesh(axes: AxesLike, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a Mesh with axes ("data", "fsdp", "tensor") over `devices` (default: all devices).

    `axes` is a mapping or a sequence of (name, size); missing axes are 1, exactly one may be -1
    and is filled from the device count, e.g. ``make_mesh({"data": -1})`` or
    ``make_mesh([("data", 2), ("fsdp", -1), ("tensor", 2)])``.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(axes, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    mesh = Mesh(_device_array(shape, devices), MESH_AXES)
    log.info("mesh %s over %d %s devices", dict(zip(MESH_AXES, shape)), len(devices),
             devices[0].platform)
    return mesh


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over data x fsdp; other dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shard_count(mesh: Mesh) -> int:
    """How many ways `batch_sharding` splits the batch: the product of the mesh's data x fsdp sizes."""
    return math.prod(int(mesh.shape[a]) for a in BATCH_AXES if a in mesh.shape)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the full value (scalars, small frozen trees, rng keys)."""
    return NamedSharding(mesh, P())
