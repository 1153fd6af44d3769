"""Variants of our UNet's compiled program timed against each other in one process (issue 21).

    python -m bench.unet_ab --preset sd2-small --variants default,xla:xla_cpu_enable_fast_math=true
    python -m bench.unet_ab --preset sd2-small --variants default,loop-above:2097152,attention:plain
    python -m bench.unet_ab --preset sd2-small --variants default --rusage   # page faults, CPU time
    python -m bench.unet_ab --preset sd2-small --variants flipped-kernels --gradient-only --rusage

Why one process, interleaved: on the shared 2-core machine the same command's time moved by a
quarter within one session (bench/README.md, "What did not close the SD2-shaped gap"), so a before
and an after run in two processes minutes apart can measure the machine instead of the change.
Here every variant is compiled first, then the calls rotate through the variants for `--rounds`
rounds (`--calls` of each per round), so a slow spell hits all of them alike.

Variants (comma-separated):
- default: the UNet as it is;
- xla:OPTION=VALUE: one XLA compile option for this variant's programs
  (`compile(compiler_options=...)`), e.g. xla:xla_cpu_enable_fast_math=true;
- attention:plain or attention:loop: t2i/attention.py's implementation for every call;
- loop-above:BYTES: `attention.LOOP_ABOVE_BYTES`, the logits size above which the CPU loops;
- flipped-kernels: the convolutions' kernels flipped once for the input gradient and passed beside
  the params (`nn_blocks.input_gradient_kernels`), as the trainer does for its frozen UNet.

Reports, per variant, the median forward and forward + text-gradient times, and the largest
difference of its outputs and gradients from the first variant's, and the number of loops in its
compiled gradient program (the CPU attention loop's forward and backward among them). With `--rusage`: the minor page
faults and the user and system CPU time per gradient call (`getrusage`, all threads of the process).
`--gradient-only` skips the forward calls, so the gradient runs back to back as in a training loop
(a forward between two gradients frees and maps different buffers; bench/README.md, "The allocator").
Ours runs data parallel over `--devices` CPU devices, as in `bench.unet_cpu`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dediffusion_jax.cli_flags import answer_help_early

VARIANT_KINDS = ("default", "xla", "attention", "loop-above", "flipped-kernels")


def build_parser() -> argparse.ArgumentParser:
    from bench.unet_cpu import PRESETS

    p = argparse.ArgumentParser(prog="python -m bench.unet_ab", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--preset", default="sd2-small", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--variants", default="default", help="comma-separated, see above")
    p.add_argument("--batch", type=int, default=0, help="0: the preset's")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--calls", type=int, default=3, help="calls of each program per variant and round")
    p.add_argument("--devices", type=int, default=0, help="CPU devices (0: the number of cores)")
    p.add_argument("--rusage", action="store_true", help="page faults and CPU time per gradient call")
    p.add_argument("--gradient-only", action="store_true",
                   help="time only the gradient calls, back to back (the forward column reads -)")
    p.add_argument("--out", help="write unet_ab.json and unet_ab.md here")
    return p


def _option_value(text: str) -> bool | int | float | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_variant(variant: str) -> None:
    """Raises ValueError with the reason when `variant` is not one this benchmark knows."""
    kind, _, value = variant.partition(":")
    if kind not in VARIANT_KINDS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANT_KINDS)} (KIND:VALUE)")
    if kind in ("default", "flipped-kernels") and value:
        raise ValueError(f"variant {variant!r}: {kind} takes no value")
    if kind == "xla" and (not value.partition("=")[0] or "=" not in value):
        raise ValueError(f"variant {variant!r}: expected xla:OPTION=VALUE")
    if kind == "attention" and value not in ("plain", "loop"):
        raise ValueError(f"variant {variant!r}: expected attention:plain or attention:loop")
    if kind == "loop-above" and not value.isdigit():
        raise ValueError(f"variant {variant!r}: expected loop-above:BYTES (an integer)")


@contextlib.contextmanager
def applied(variant: str) -> Iterator[dict[str, Any]]:
    """Sets what the variant changes while its programs are traced; yields its compile options."""
    from dediffusion_jax.t2i import attention

    kind, _, value = variant.partition(":")
    saved_env, saved_bytes = os.environ.get("DEDIFFUSION_ATTENTION"), attention.LOOP_ABOVE_BYTES
    try:
        if kind == "attention":
            os.environ["DEDIFFUSION_ATTENTION"] = value
        elif kind == "loop-above":
            attention.LOOP_ABOVE_BYTES = int(value)
        option, _, setting = value.partition("=")
        yield {option: _option_value(setting)} if kind == "xla" else {}
    finally:
        attention.LOOP_ABOVE_BYTES = saved_bytes
        if saved_env is None:
            os.environ.pop("DEDIFFUSION_ATTENTION", None)
        else:
            os.environ["DEDIFFUSION_ATTENTION"] = saved_env


def measure(preset: str, variants: list[str], batch: int, rounds: int, calls: int, devices: int,
            rusage: bool, gradient_only: bool = False) -> list[dict[str, Any]]:
    """One summary row per variant: median times, the difference from the first, loops, CPU use."""
    import jax
    import numpy as np

    from bench.unet_cpu import random_unet
    from dediffusion_jax.t2i import nn_blocks

    _, model, params, (sample, steps, text, weight) = random_unet(preset, batch)
    used = max(n for n in range(1, devices + 1) if batch % n == 0)  # the most that split the batch
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:used]), ("data",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(params, params_sharding)
    x, t, c, w = (jax.device_put(a, split) for a in (sample, steps, text, weight))

    flipped = jax.device_put(nn_blocks.input_gradient_kernels(params), params_sharding)
    programs, loops, variables = {}, {}, {}
    for variant in variants:
        variables[variant] = {"params": params}
        if variant == "flipped-kernels":
            variables[variant][nn_blocks.INPUT_GRAD_KERNELS] = flipped

        # Fresh functions per variant: jax caches a trace per function, and a variant changes tracing.
        def forward(p, x, t, c):
            return model.apply(p, x, t, c)

        def text_grad(c, p, x, t, w):
            return jax.grad(lambda c: (forward(p, x, t, c) * w).sum())(c)

        with applied(variant) as options:
            start = time.perf_counter()
            programs[variant] = (
                jax.jit(forward).lower(variables[variant], x, t, c).compile(compiler_options=options),
                jax.jit(text_grad).lower(c, variables[variant], x, t, w).compile(compiler_options=options))
            print(f"{variant}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
        loops[variant] = programs[variant][1].as_text().count(" while(")

    def arguments(variant: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return (variables[variant], x, t, c), (c, variables[variant], x, t, w)

    reference = [np.asarray(f(*a)) for f, a in zip(programs[variants[0]], arguments(variants[0]))]
    rows = {v: {"variant": v, "forward_ms": [], "text_grad_ms": [], "faults": 0, "user_s": 0.0, "system_s": 0.0,
                "max_abs_diff": max(float(np.abs(np.asarray(f(*a)) - r).max())
                                    for f, a, r in zip(programs[v], arguments(v), reference))}
            for v in variants}
    for _ in range(rounds):
        for variant, (fwd, grad) in programs.items():
            row = rows[variant]
            fwd_args, grad_args = arguments(variant)
            for _ in range(0 if gradient_only else calls):
                start = time.perf_counter()
                jax.block_until_ready(fwd(*fwd_args))
                row["forward_ms"].append(1e3 * (time.perf_counter() - start))
            for _ in range(calls):
                before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                jax.block_until_ready(grad(*grad_args))
                row["text_grad_ms"].append(1e3 * (time.perf_counter() - start))
                after = resource.getrusage(resource.RUSAGE_SELF)
                row["faults"] += after.ru_minflt - before.ru_minflt
                row["user_s"] += after.ru_utime - before.ru_utime
                row["system_s"] += after.ru_stime - before.ru_stime
    out = []
    for row in rows.values():
        n = len(row["text_grad_ms"])
        summary = {"preset": preset, "batch": batch, "devices": mesh.size, "variant": row["variant"],
                   "forward_ms": round(statistics.median(row["forward_ms"]), 1) if row["forward_ms"] else "-",
                   "text_grad_ms": round(statistics.median(row["text_grad_ms"]), 1),
                   "max_abs_diff": row["max_abs_diff"], "loops_in_gradient": loops[row["variant"]]}
        if rusage:
            summary.update(minor_faults_per_call=round(row["faults"] / n),
                           user_ms_per_call=round(1e3 * row["user_s"] / n, 1),
                           system_ms_per_call=round(1e3 * row["system_s"] / n, 1))
        out.append(summary)
    return out


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    extra = "minor_faults_per_call" in rows[0]
    head = (f"{env['date']}, {env['cores']} cores, jax {env['jax']}, {env['rounds']} rounds x {env['calls']} calls, "
            f"load average {env['load_average']}, GLIBC_TUNABLES {env['glibc_tunables']!r}, "
            f"LD_PRELOAD {env['ld_preload']!r}\n\n"
            "| preset | batch | devices | variant | forward ms | forward + text gradient ms | max diff vs first | loops |"
            + (" minor faults / call | user ms / call | system ms / call |" if extra else "") + "\n"
            "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if extra else "") + "\n")
    lines = [f"| {r['preset']} | {r['batch']} | {r['devices']} | `{r['variant']}` | {r['forward_ms']} | "
             f"{r['text_grad_ms']} | {r['max_abs_diff']:.1e} | {r['loops_in_gradient']} |"
             + (f" {r['minor_faults_per_call']} | {r['user_ms_per_call']} | {r['system_ms_per_call']} |" if extra else "")
             for r in rows]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.unet_cpu import PRESETS, allocator_settings, report

    args = build_parser().parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.preset not in PRESETS:
        print(f"error: --preset {args.preset!r}: expected one of {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    try:
        if not variants or len(set(variants)) != len(variants):
            raise ValueError(f"--variants {args.variants!r}: give each variant once")
        if args.rounds < 1 or args.calls < 1:
            raise ValueError("--rounds and --calls: at least 1")
        for variant in variants:
            check_variant(variant)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    from dediffusion_jax import cpu_devices

    devices = min(cpu_devices.split_cpu(args.devices), jax.device_count())
    env = {"cores": os.cpu_count(), "jax": jax.__version__, "rounds": args.rounds, "calls": args.calls,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_average": [round(v, 1) for v in os.getloadavg()], **allocator_settings()}
    try:
        rows = measure(args.preset, variants, args.batch or PRESETS[args.preset]["batch"], args.rounds,
                       args.calls, devices, args.rusage, args.gradient_only)
    except Exception as e:  # an XLA option this jaxlib does not have, for one
        if "compile option" not in str(e):
            raise
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    report(markdown(rows, env), env, rows, args.out, "unet_ab")
    return 0


if __name__ == "__main__":
    answer_help_early(build_parser)
    sys.exit(main())
