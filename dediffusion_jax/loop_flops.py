"""FLOPs of a jitted program with every `scan` body counted as many times as it runs.

XLA's cost analysis (`compiled.cost_analysis()["flops"]`) counts the body of a loop once, not once per
iteration (jax 0.10, XLA:CPU; `xla_counts_loop_trips` checks the backend at hand). The De-Diffusion
train step's only loops are the fused vocabulary head's chunk loops (models/quantizer.py: one in the
forward, one in the backward), so XLA's figure for a chunked step misses (chunks - 1) x those bodies and
the logged TFLOP/s would move with `quantizer.rows_per_chunk`. `corrected_flops` adds them back: it walks
the traced program (jaxpr), compiles each scan body on its own for XLA's count of one iteration, and
adds (length - 1) of them (nested scans: the inner ones `length` times more).

XLA's figure of a partitioned program is per device, while the jaxpr has global shapes: a scan whose
named scope says `batch_shards_S` (`sharded_scope`; the fused op's, whose every iteration is split over
S batch shards) counts 1/S of its global body per device; any other scan is counted whole (as if
replicated on every device). Loops whose trip count is not static (`while_loop`) and loops XLA makes
inside one primitive's lowering (XLA:CPU's rolled threefry rounds) are not corrected.
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

_SHARDS = re.compile(r"\.batch_shards_(\d+)")


def sharded_scope(name: str, shards: int) -> contextlib.AbstractContextManager:
    """A named scope for a loop each of whose iterations is split over `shards` batch shards."""
    return jax.named_scope(f"{name}.batch_shards_{int(shards)}")


def _flops(cost: Any) -> float:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def _xla_flops(closed: Any) -> float:
    """XLA's FLOPs of a ClosedJaxpr compiled on its own (one iteration of a loop body)."""
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.in_avals]
    return _flops(jax.jit(jax_core.jaxpr_as_fun(closed)).lower(*args).compile().cost_analysis())


@functools.lru_cache(maxsize=None)
def xla_counts_loop_trips(backend: str | None = None) -> bool:
    """Whether the backend's cost analysis already counts a scan body once per iteration (then nothing
    is added). Decided by a 4-iteration scan of a matmul against the same work in one iteration."""
    del backend  # the cache key: the default backend when called

    def f(x):
        return jax.lax.scan(lambda c, r: (c + jnp.sum(r @ r.T), None), jnp.float32(0), x)[0]

    cost = lambda n: _flops(jax.jit(f).lower(  # noqa: E731
        jax.ShapeDtypeStruct((n, 32, 64), jnp.float32)).compile().cost_analysis())
    return cost(4) > 2 * cost(1)


def _sub_jaxprs(eqn: Any) -> list[Any]:
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if hasattr(item, "eqns") or (hasattr(item, "jaxpr") and hasattr(item, "consts")):
                found.append(item)
    return found


def scan_extra_flops(jaxpr: Any) -> float:
    """FLOPs (per device) that XLA's one-count of each scan body in `jaxpr` leaves out."""
    inner = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr or Jaxpr
    total = 0.0
    for eqn in inner.eqns:
        if eqn.primitive.name == "scan":
            body, length = eqn.params["jaxpr"], int(eqn.params["length"])
            match = _SHARDS.search(str(eqn.source_info.name_stack))
            shards = int(match.group(1)) if match else 1
            once = _xla_flops(body) if length > 1 else 0.0
            total += ((length - 1) * once + length * scan_extra_flops(body)) / shards
        elif eqn.primitive.name == "cond":  # one branch runs: the costliest
            total += max((scan_extra_flops(b) for b in eqn.params["branches"]), default=0.0)
        else:
            total += sum(scan_extra_flops(sub) for sub in _sub_jaxprs(eqn))
    return total


def corrected_flops(jaxpr: Any, xla_flops: float) -> float:
    """`xla_flops` (XLA's cost analysis of the program `jaxpr` was traced into) with every scan body
    counted as many times as it runs."""
    if xla_counts_loop_trips(jax.default_backend()):
        return xla_flops
    return xla_flops + scan_extra_flops(jaxpr)
