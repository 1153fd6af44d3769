"""The sharded train step: one `jax.jit` with explicit shardings, donated state, compiled ahead of time.

State layout: `TrainState(step, params, opt_state)` holds ONLY the trainable encoder params and their
optimizer state; the frozen tree ({"backbone"?, "decoder"}) is a separate, non-donated argument that is
placed on the mesh once. The same code runs on one CPU (a 1-device mesh) and on a pod.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dediffusion_jax import loop_flops
from dediffusion_jax.parallel import sharding as sharding_lib
from dediffusion_jax.parallel.mesh import batch_sharding, replicated
from dediffusion_jax.models.dediffusion import DeDiffusion

log = logging.getLogger(__name__)
Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any


def split_params(params: Any, freeze_backbone: bool) -> tuple[dict, dict]:
    """Encoder params -> (trainable, frozen-encoder part). Frozen weights never meet the optimizer."""
    params = dict(params)
    if freeze_backbone and "backbone" in params:
        return {k: v for k, v in params.items() if k != "backbone"}, {"backbone": params["backbone"]}
    return params, {}


@dataclasses.dataclass
class StepFunctions:
    """The compiled step plus what a loop needs to call it and report on it."""

    step: Callable[..., tuple[TrainState, dict]]
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: NamedSharding
    compile_seconds: float = 0.0
    # XLA's FLOP estimate per device with every loop body counted as many times as it runs
    # (dediffusion_jax.loop_flops); xla_flops_per_step: XLA's own figure, which counts a body once.
    flops_per_step: float | None = None
    memory: dict[str, int] = dataclasses.field(default_factory=dict)
    xla_flops_per_step: float | None = None


def make_step_fn(
    model: DeDiffusion,
    optimizer: optax.GradientTransformation,
    lr_fn: Callable[[Array], Array],
    temperature_fn: Callable[[Array], Array],
) -> Callable[[TrainState, Any, dict, Array], tuple[TrainState, dict]]:
    """The pure (unjitted) step: loss, gradients w.r.t. the trainable params only, update, metrics."""

    def step_fn(state: TrainState, frozen: Any, batch: dict, rng: Array) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(rng, state.step)
        temperature = temperature_fn(state.step)
        (loss, aux), grads = jax.value_and_grad(model.loss, has_aux=True)(
            state.params, frozen, batch, rng, temperature, state.step
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "temperature": temperature,
            "learning_rate": lr_fn(state.step),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates),
            **model.token_stats(params, aux["features"]),
            **{k: v for k, v in aux.items() if k != "features"},
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    return step_fn


def state_shardings_for(abstract_state: TrainState, mesh: Mesh, rules: Any) -> Any:
    """NamedShardings for the train state: params and optimizer statistics by the encoder rules."""
    return TrainState(
        step=NamedSharding(mesh, P()),
        params=sharding_lib.tree_shardings(abstract_state.params, mesh, rules),
        opt_state=sharding_lib.tree_shardings(abstract_state.opt_state, mesh, rules),
    )


def compile_step(
    step_fn: Callable[..., Any],
    state: TrainState,
    state_shardings: Any,
    frozen: Any,
    frozen_shardings: Any,
    example_batch: dict[str, Any],
    mesh: Mesh,
    rng: Array,
) -> StepFunctions:
    """jit with explicit in/out shardings and donated state, lowered and compiled ahead of time.

    Logs compile time, XLA's FLOP estimate (loop bodies counted per iteration: the fused vocabulary
    head's chunk loops, `dediffusion_jax.loop_flops`) and memory analysis so a run states its cost up
    front.
    """
    batch_sh = batch_sharding(mesh)
    batch_shardings = jax.tree.map(lambda _: batch_sh, example_batch)
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, frozen_shardings, batch_shardings, replicated(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
    abstract_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sh), example_batch
    )
    start = time.perf_counter()
    traced = jitted.trace(state, frozen, abstract_batch, rng)
    compiled = traced.lower().compile()
    seconds = time.perf_counter() - start
    flops = xla_flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = xla_flops = float(cost.get("flops", 0.0)) or None
        if xla_flops:
            flops = loop_flops.corrected_flops(traced.jaxpr, xla_flops)
    except Exception:  # cost analysis is best-effort on some backends
        pass
    memory: dict[str, int] = {}
    try:
        analysis = compiled.memory_analysis()
        for name in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            if hasattr(analysis, name):
                memory[name] = int(getattr(analysis, name))
    except Exception:
        pass
    log.info(
        "compiled train step in %.1f s; %s GFLOP/step (XLA estimate per device, loop bodies counted per "
        "iteration; %s as XLA counts them); memory %s",
        seconds, f"{flops / 1e9:.2f}" if flops else "?", f"{xla_flops / 1e9:.2f}" if xla_flops else "?",
        memory,
    )
    return StepFunctions(compiled, state_shardings, frozen_shardings, batch_sh, seconds, flops, memory,
                         xla_flops)
