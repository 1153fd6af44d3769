"""Our Flax UNet against diffusers' torch UNet on the same weights, inputs and cores (issue 21).

    python -m bench.unet_cpu --preset world,sd2-small --out /tmp/unet_cpu
    python -m bench.unet_cpu --preset tiny --repeats 3          # seconds: what CI runs

Times the two things the De-Diffusion step asks of its frozen UNet: the forward, and the forward +
gradient with respect to the text states (the encoder's signal; no weight gradients). Both sides are
float32, torch with SDPA attention at `--torch-threads`; each figure is the median of `--repeats`
calls (our compile is reported apart), taken in blocks of three that alternate between ours and
torch's, each block after one untimed call, so that a slow spell of a shared machine hits both
sides alike and neither pays for memory the other just freed. The outputs are compared as a parity check.
Our gradient gets the convolution kernels flipped once beside the params, as the train step does on
CPU (config `decoder.flip_conv_kernels`, t2i/custom_grads.py).
Run it as `make` runs everything: with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` and, where installed,
tcmalloc preloaded (`LD_PRELOAD`; bench/README.md, "Huge pages" and "The allocator"). Both sides run in
one process, so both get the allocator; the settings in force are recorded with the figures.
`DEDIFFUSION_ATTENTION=plain` times our attention without the CPU loop (t2i/attention.py).

Ours runs data parallel over `--devices` CPU devices (default: one per core, `cpu_devices.split_cpu`),
the batch split between them and the weights replicated, as the trainer runs a mesh: XLA:CPU runs
each device's program on its own thread, which uses the cores better than one device's intra-op
threads do (bench/README.md, "Cores as devices"). `--devices 1` times the single-device program.

Presets (random weights, seed 0, from the configs written here):
- world: the world decoder's UNet (projects/miniworld/assets/decoder: 32/64/128 channels, 4 heads,
  16x16x3 pixels, 128-d text, 16 tokens) without its position-embedding extension, which diffusers
  does not have (one addition per transformer; the same cost otherwise); batch 32.
- sd2-small: SD2-base's layout (linear projection, heads of 64, 1024-d text states, 77 tokens) at
  64/128/256/256 channels (36M parameters) and 32x32x4 latents; batch 8.
- tiny: two blocks of 16/32 channels, 8x8 latents; batch 2 (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dediffusion_jax.cli_flags import answer_help_early

PRESETS: dict[str, dict[str, Any]] = {
    "world": {"batch": 32, "tokens": 16, "unet": {
        "sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64, 128],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3, "up_block_types": ["CrossAttnUpBlock2D"] * 3,
        "layers_per_block": 1, "attention_head_dim": 4, "cross_attention_dim": 128, "norm_num_groups": 8,
        "addition_embed_type": "text", "addition_embed_type_num_heads": 4}},
    "sd2-small": {"batch": 8, "tokens": 77, "unet": {
        "sample_size": 32, "in_channels": 4, "out_channels": 4, "block_out_channels": [64, 128, 256, 256],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2,
        "attention_head_dim": [1, 2, 4, 4], "cross_attention_dim": 1024, "use_linear_projection": True}},
    "tiny": {"batch": 2, "tokens": 8, "unet": {
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [16, 32],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
        "attention_head_dim": 2, "cross_attention_dim": 32, "norm_num_groups": 8}},
}


def allocator_settings() -> dict[str, str]:
    """The process's allocator settings (read at its start), recorded beside every timing."""
    return {"glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "ld_preload": os.environ.get("LD_PRELOAD", "")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.unet_cpu", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--preset", default="world,sd2-small", help=f"comma-separated: {', '.join(PRESETS)}")
    p.add_argument("--batch", type=int, default=0, help="0: the preset's")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--torch-threads", type=int, default=0, help="0: the number of cores")
    p.add_argument("--devices", type=int, default=0,
                   help="CPU devices our side splits the batch over (0: the number of cores)")
    p.add_argument("--out", help="write unet_cpu.json and unet_cpu.md here")
    return p


BLOCK_CALLS = 3


def _alternating_medians_ms(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int,
                            block: int = BLOCK_CALLS) -> tuple[float, float]:
    """Median milliseconds of each over `repeats` timed calls, taken in blocks of up to `block`
    calls that alternate between the two sides; each block starts with one untimed call.

    Why blocks and not single calls: on this VM a call right after the other side's pays for
    memory the other side freed (the host reclaims freed pages; faulting them back in cost our
    SD2-shaped gradient 0.5-1.5 s of system time, bench/README.md, "Timing in blocks"), which a
    training loop, calling the same program back to back, never pays. Alternating blocks still
    lets a slow spell of a shared machine hit both sides."""
    times: tuple[list[float], list[float]] = ([], [])
    while len(times[0]) < repeats:
        calls = min(block, repeats - len(times[0]))
        for fn, out in zip((ours, theirs), times):
            fn()
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


def random_unet(preset: str, batch: int) -> tuple[Any, Any, Any, tuple[Any, ...]]:
    """The preset's UNet with random weights (seed 0) and random float32 inputs: (config, model,
    params, (sample, timesteps, text states, output weight)), arrays channels-last as ours takes them."""
    import jax
    import numpy as np

    from dediffusion_jax.t2i.unet import UNet2DConditionModel, UNetConfig, dummy_inputs

    spec = PRESETS[preset]
    config = UNetConfig.from_dict(spec["unet"])
    model = UNet2DConditionModel(config)
    params = model.init(jax.random.key(0), *dummy_inputs(config))["params"]
    rng = np.random.default_rng(0)
    size = config.sample_size
    sample = rng.standard_normal((batch, size, size, config.in_channels)).astype(np.float32)
    steps = rng.integers(0, 1000, batch).astype(np.int32)
    text = rng.standard_normal((batch, spec["tokens"], config.cross_attention_dim)).astype(np.float32)
    weight = rng.standard_normal((batch, size, size, config.out_channels)).astype(np.float32)
    return config, model, params, (sample, steps, text, weight)


def measure(preset: str, batch: int, repeats: int, devices: int = 1) -> dict[str, Any]:
    """Forward and text-state gradient, ours and diffusers', with the outputs' largest difference."""
    import diffusers
    import jax
    import numpy as np
    import torch

    from dediffusion_jax.t2i import convert, nn_blocks

    config, model, params, (sample, steps, text, weight) = random_unet(preset, batch)

    forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    # The gradient as the train step runs it on CPU: the kernels flipped once, beside the params
    # (config.decoder.flip_conv_kernels, t2i/custom_grads.py).
    text_grad = jax.jit(jax.grad(lambda c, v, x, t, w: (model.apply(v, x, t, c) * w).sum()))
    used = max(n for n in range(1, devices + 1) if batch % n == 0)  # the most that split the batch
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:used]), ("data",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    variables = {"params": params, nn_blocks.INPUT_GRAD_KERNELS: jax.device_put(
        nn_blocks.input_gradient_kernels(params), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))}
    args = [jax.device_put(a, split) for a in (sample, steps, text)]
    ours_weight = jax.device_put(weight, split)
    start = time.perf_counter()
    ours_out = np.asarray(forward(params, *args))
    jax.block_until_ready(text_grad(args[2], variables, args[0], args[1], ours_weight))
    compile_s = time.perf_counter() - start

    theirs = diffusers.UNet2DConditionModel.from_config(config.to_dict()).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in convert.flax_to_torch(params).items()}
    theirs.load_state_dict(state, strict=True)
    t_sample = torch.from_numpy(sample).permute(0, 3, 1, 2).contiguous()
    t_steps, t_text = torch.from_numpy(steps).long(), torch.from_numpy(text)
    t_weight = torch.from_numpy(weight).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        theirs_out = theirs(t_sample, t_steps, t_text).sample.permute(0, 2, 3, 1).numpy()

    def torch_grad() -> None:
        c = t_text.clone().requires_grad_(True)
        (theirs(t_sample, t_steps, c).sample * t_weight).sum().backward()

    def torch_forward() -> None:
        with torch.no_grad():
            theirs(t_sample, t_steps, t_text)

    for p in theirs.parameters():
        p.requires_grad_(False)  # frozen, as in the step: input gradients only
    rows = dict(zip(("ours_forward_ms", "torch_forward_ms"), _alternating_medians_ms(
        lambda: forward(params, *args).block_until_ready(), torch_forward, repeats)))
    rows.update(zip(("ours_text_grad_ms", "torch_text_grad_ms"), _alternating_medians_ms(
        lambda: text_grad(args[2], variables, args[0], args[1], ours_weight).block_until_ready(), torch_grad, repeats)))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    return {"preset": preset, "batch": batch, "devices": mesh.size, "params_m": round(n_params / 1e6, 2), "compile_s": round(compile_s, 1),
            **{k: round(v, 1) for k, v in rows.items()},
            "forward_ratio": round(rows["ours_forward_ms"] / rows["torch_forward_ms"], 2),
            "text_grad_ratio": round(rows["ours_text_grad_ms"] / rows["torch_text_grad_ms"], 2),
            "max_abs_diff": float(np.abs(ours_out - theirs_out).max())}


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    head = (f"CPU, {env['cores']} cores, torch threads {env['torch_threads']}, jax {env['jax']}, torch {env['torch']}, "
            f"{env['date']}; our attention {env['attention']}; GLIBC_TUNABLES {env['glibc_tunables']!r}; "
            f"LD_PRELOAD {env['ld_preload']!r}; "
            f"median of {env['repeats']} calls in alternating blocks of {BLOCK_CALLS}\n\n"
            "| preset | batch | our devices | params (M) | forward ours / torch ms "
            "| ratio | forward + text gradient ours / torch ms | ratio | outputs max diff |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [f"| {r['preset']} | {r['batch']} | {r['devices']} | {r['params_m']} | {r['ours_forward_ms']} / {r['torch_forward_ms']} "
                      f"| {r['forward_ratio']}x | {r['ours_text_grad_ms']} / {r['torch_text_grad_ms']} | "
                      f"{r['text_grad_ratio']}x | {r['max_abs_diff']:.1e} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        print(f"error: --preset {args.preset!r}: expected some of {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    import jax
    import torch

    from dediffusion_jax import cpu_devices

    devices = min(cpu_devices.split_cpu(args.devices), jax.device_count())
    threads = args.torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    env = {"cores": os.cpu_count(), "torch_threads": threads, "jax": jax.__version__,
           "torch": torch.__version__.split("+")[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "repeats": args.repeats, "load_average": [round(x, 1) for x in os.getloadavg()],
           "attention": os.environ.get("DEDIFFUSION_ATTENTION", "auto"), **allocator_settings()}
    rows = []
    for preset in presets:
        rows.append(measure(preset, args.batch or PRESETS[preset]["batch"], args.repeats, devices))
        print(json.dumps(rows[-1]), flush=True)
    report(markdown(rows, env), env, rows, args.out, "unet_cpu")
    return 0


def report(table: str, env: dict[str, Any], rows: list[dict[str, Any]], out: str | None, name: str) -> None:
    """Prints the table; with `out`, writes it and the rows as NAME.md and NAME.json there."""
    print(table, end="")
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
        (folder / f"{name}.md").write_text(table)


if __name__ == "__main__":
    answer_help_early(build_parser)
    sys.exit(main())
