"""Where a world train step's time goes on this machine: data, the whole step, and its parts.

    python projects/miniworld/bench/step_breakdown.py [--config-arg ARG] [--iters 30]
    python projects/miniworld/bench/step_breakdown.py --devices 8 --iters 20   # the sharded step only

Times (median of --iters, after a warm-up): the host data pipeline alone (next batch), the jitted
train step on a fixed batch, and inside it the encoder forward (images -> text states), the frozen
UNet forward, and the UNet forward + backward to its text states (what the encoder's gradient costs).
The step's budget is what the 15-minute demo can afford (docs/miniworld.md, "The demo").

`--devices N` times the trainer's own sharded step instead (`step.compile_step` on a data-parallel mesh
of N fake CPU devices, state and frozen weights placed as the trainer places them, the same global
batch): run it with 1 and with 8 to see what the fake mesh costs (issue 21; bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "world.py"

from dediffusion_jax.train.cli import load_config_file  # noqa: E402  (light: no jax)


def median_seconds(fn, iters: int) -> float:
    import jax
    import numpy as np

    fn()  # warm-up (compile)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-arg", default="")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--devices", type=int, default=0,
                   help="time only the trainer's sharded step on this many (fake CPU) devices")
    args = p.parse_args(argv)
    if args.devices:
        if "jax" in sys.modules:
            raise SystemExit("--devices must be set before JAX is imported (run this file as a command)")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
        return sharded_step(args.config_arg, args.iters)
    # Heavy imports after the arguments: `--help` starts nothing.
    import jax
    import jax.numpy as jnp

    from dediffusion_jax.t2i import schedules
    from dediffusion_jax.train import step as step_lib
    from dediffusion_jax.train.loop import build_parts, load_decoder_for, make_data

    spec = str(CONFIG_FILE) + (f":{args.config_arg}" if args.config_arg else "")
    config = load_config_file(spec)
    decoder = load_decoder_for(config)
    parts = build_parts(config, decoder)
    model = parts.model
    key = jax.random.key(0)
    frozen = parts.frozen_params()
    state = jax.jit(parts.init_state)(key, parts.state_backbone_arg)

    data_iter = iter(make_data(config, decoder))
    results = {"data: next batch (host)": median_seconds(lambda: next(data_iter), args.iters)}
    batch = {k: jnp.asarray(v) for k, v in next(data_iter).items() if k in ("backbone", "decoder")}

    step = jax.jit(step_lib.make_step_fn(model, parts.optimizer, parts.lr_fn, parts.temperature_fn))
    results["train step (jit, fixed batch)"] = median_seconds(lambda: step(state, frozen, batch, key)[1]["loss"],
                                                              args.iters)
    temp = jnp.float32(1.0)
    states_fn = jax.jit(lambda tr, im: model.text_states(tr, frozen, im, key, temp)[0])
    results["encoder -> text states (forward)"] = median_seconds(lambda: states_fn(state.params, batch["backbone"]),
                                                                 args.iters)
    states = states_fn(state.params, batch["backbone"])
    unet = model.decoder.unet
    unet_params = frozen["decoder"]["unet"]
    unet_variables = model.unet_variables(frozen)  # as the step passes them (flipped kernels on CPU)
    b = batch["decoder"].shape[0]
    t = jnp.full((b,), 900, jnp.int32)
    x_t = schedules.add_noise(model.decoder.schedule, batch["decoder"], jnp.zeros_like(batch["decoder"]), t)
    fwd = jax.jit(lambda s: unet.apply(unet_variables, x_t, t, s))
    cost = fwd.lower(states).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    unet_gflop = float((cost or {}).get("flops", 0.0)) / 1e9
    results["UNet forward"] = median_seconds(lambda: fwd(states), args.iters)
    bwd = jax.jit(jax.grad(lambda s: jnp.mean(jnp.square(unet.apply(unet_variables, x_t, t, s)))))
    results["UNet forward + backward to text states"] = median_seconds(lambda: bwd(states), args.iters)

    print(f"batch {b}, {jax.device_count()} device(s) {jax.devices()[0].platform}; median of {args.iters}:")
    for name, sec in results.items():
        print(f"  {name:45s} {sec * 1e3:8.1f} ms")
    n_params = sum(x.size for x in jax.tree.leaves(unet_params))
    print(f"  UNet: {n_params / 1e6:.2f}M parameters, {unet_gflop:.1f} GFLOP per forward (XLA's count), "
          f"{unet_gflop / results['UNet forward']:.1f} GFLOP/s")
    print(f"  => {1.0 / results['train step (jit, fixed batch)']:.2f} steps/s without the data pipeline")
    return 0


def sharded_step(config_arg: str, iters: int) -> int:
    """The trainer's AOT-compiled, donated step on a data-parallel mesh of every device."""
    import dataclasses

    import jax
    import numpy as np

    from dediffusion_jax.parallel import sharding as sharding_lib
    from dediffusion_jax.parallel.mesh import batch_shard_count, make_mesh
    from dediffusion_jax.train import step as step_lib
    from dediffusion_jax.train.loop import build_parts, device_fields, load_decoder_for, make_data

    config = load_config_file(str(CONFIG_FILE) + (f":{config_arg}" if config_arg else ""))
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    decoder = load_decoder_for(config)
    parts = build_parts(config, decoder)
    key = jax.random.key(0)
    state = jax.jit(parts.init_state)(key, parts.state_backbone_arg)
    state_sh = step_lib.state_shardings_for(state, mesh, sharding_lib.ENCODER_RULES)
    state = jax.device_put(state, state_sh)
    frozen = parts.frozen_params()
    frozen_sh = sharding_lib.tree_shardings(frozen, mesh, sharding_lib.frozen_rules(fsdp=False))
    frozen = jax.device_put(frozen, frozen_sh)
    batch = device_fields(next(iter(make_data(config, decoder))))
    step_fn = step_lib.make_step_fn(dataclasses.replace(parts.model, batch_shards=batch_shard_count(mesh)),
                                    parts.optimizer, parts.lr_fn, parts.temperature_fn)
    compiled = step_lib.compile_step(step_fn, state, state_sh, frozen, frozen_sh, batch, mesh, key)
    batch = jax.device_put(batch, compiled.batch_sharding)
    times = []
    for i in range(iters + 2):  # two warm-up steps
        start = time.perf_counter()
        state, metrics = compiled.step(state, frozen, batch, key)
        jax.block_until_ready(metrics)
        if i >= 2:
            times.append(time.perf_counter() - start)
    b = next(iter(batch.values())).shape[0]
    print(f"sharded train step: {jax.device_count()} {jax.devices()[0].platform} device(s), global batch {b}, "
          f"compiled in {compiled.compile_seconds:.1f} s; median of {iters}: {np.median(times) * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
