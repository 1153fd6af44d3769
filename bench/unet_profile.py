"""Where our UNet's CPU time goes: a profile of the compiled program, grouped by the UNet's parts.

    python -m bench.unet_profile --preset world --mode grad      # forward + text gradient, ~1 min
    python -m bench.unet_profile --preset world --mode forward

Timing a part alone (an attention call, a convolution) is not how it runs inside the whole program:
XLA fuses it with its neighbours and schedules it among them (bench/README.md: a faster attention
backward alone changed nothing in the UNet). This traces the jitted UNet of `bench.unet_cpu`'s preset
with `jax.profiler` (`--calls` executions), reads every executed op's duration from the Perfetto
trace, and attributes it through the compiled HLO's metadata (op_name: the Flax module path and the
jax primitive) to a part: self-attention (attn1), cross-attention (attn2), feed-forward (ff), norms,
convolutions, other; `backward` where the op belongs to the gradient (transpose(jvp(...))), `loop`
where it runs in the CPU attention loop's body. Ops that carry no metadata (XLA:CPU's dots inside a
loop body, for one) are listed apart with their HLO instruction. Times are per call and include the
profiler's overhead (a few percent): compare parts within one profile.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dediffusion_jax.cli_flags import answer_help_early

PARTS = ("attn1", "attn2", "ff", "norm", "conv", "other")
_RUNTIME_EVENTS = ("ThunkExecutor", "$", "SlinkyThreadPool")  # the executor's own spans, not ops


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.unet_profile", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--preset", default="world", help="one of bench.unet_cpu's presets")
    p.add_argument("--mode", choices=("forward", "grad"), default="grad")
    p.add_argument("--batch", type=int, default=0, help="0: the preset's")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--top", type=int, default=12, help="rows of the op table")
    return p


def part_of(op_name: str) -> str:
    """The UNet part an op's metadata names (module path segments as Flax writes them)."""
    for part in ("attn1", "attn2", "ff"):
        if f"/{part}/" in op_name:
            return part
    if "norm" in op_name:
        return "norm"
    return "conv" if "conv" in op_name else "other"


def op_metadata(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its metadata op_name (absent for ops XLA created without one)."""
    return {m.group(1): m.group(2) for m in
            re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]*)\"", hlo_text)}


def attribute(durations_us: dict[str, float], hlo_text: str, calls: int) -> dict[str, Any]:
    """Per-call milliseconds by (part, direction), by primitive, and the unlabelled ops."""
    meta = op_metadata(hlo_text)
    parts: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    unlabelled: collections.Counter = collections.Counter()
    for name, us in durations_us.items():
        op = meta.get(name)
        if op is None:
            unlabelled[name] += us
            continue
        direction = "backward" if "transpose(jvp(" in op else "forward"
        where = " loop" if "/while/" in op else ""
        parts[(part_of(op), direction)] += us
        ops[(part_of(op), direction + where, op.rsplit("/", 1)[-1])] += us
    per_call = 1e-3 / calls
    lines = {n: re.search(r"%" + re.escape(n) + r" = ([^\n]{0,160})", hlo_text) for n in unlabelled}
    return {
        "total_ms": round(sum(durations_us.values()) * per_call, 1),
        "parts_ms": {f"{p} {d}": round(v * per_call, 1) for (p, d), v in sorted(parts.items())},
        "ops_ms": [{"part": p, "where": w, "primitive": o, "ms": round(v * per_call, 2)}
                   for (p, w, o), v in ops.most_common()],
        "unlabelled_ms": [{"op": n, "ms": round(v * per_call, 2), "hlo": lines[n].group(1) if lines[n] else ""}
                          for n, v in unlabelled.most_common()],
    }


def trace_durations(fn: Any, args: tuple, calls: int) -> dict[str, float]:
    """Summed microseconds per executed op over `calls` calls of a compiled function."""
    import jax

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    out: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(_RUNTIME_EVENTS):
            out[e["name"]] += float(e["dur"])
    return dict(out)


def profile(preset: str, mode: str, batch: int, calls: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.unet_cpu import PRESETS
    from dediffusion_jax.t2i import nn_blocks
    from dediffusion_jax.t2i.unet import UNet2DConditionModel, UNetConfig, dummy_inputs

    spec = PRESETS[preset]
    config = UNetConfig.from_dict(spec["unet"])
    model = UNet2DConditionModel(config)
    params = model.init(jax.random.key(0), *dummy_inputs(config))["params"]
    rng = np.random.default_rng(0)
    batch = batch or spec["batch"]
    size = config.sample_size
    x = jnp.asarray(rng.standard_normal((batch, size, size, config.in_channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    c = jnp.asarray(rng.standard_normal((batch, spec["tokens"], config.cross_attention_dim)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((batch, size, size, config.out_channels)), jnp.float32)
    # The weights are arguments, as in the train step, and the gradient gets the convolution kernels
    # flipped once beside them, as the train step does on CPU (config decoder.flip_conv_kernels).
    variables = {"params": params}
    if mode == "forward":
        fn = jax.jit(lambda c, v: model.apply(v, x, t, c))
    else:
        variables[nn_blocks.INPUT_GRAD_KERNELS] = nn_blocks.input_gradient_kernels(params)
        fn = jax.jit(jax.grad(lambda c, v: (model.apply(v, x, t, c) * w).sum()))
    jax.block_until_ready(fn(c, variables))  # compile and warm up
    hlo_text = fn.lower(c, variables).compile().as_text()
    return {"preset": preset, "mode": mode, "batch": batch, "calls": calls,
            **attribute(trace_durations(fn, (c, variables), calls), hlo_text, calls)}


def markdown(result: dict[str, Any], top: int) -> str:
    lines = [f"{result['preset']}, batch {result['batch']}, {result['mode']}: {result['total_ms']} ms of ops per call",
             "", "| part | ms per call |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(result["parts_ms"].items(), key=lambda kv: -kv[1])]
    unlabelled = sum(u["ms"] for u in result["unlabelled_ms"])
    lines += [f"| (no metadata) | {round(unlabelled, 1)} |", "", "| part | where | primitive | ms |", "|---|---|---|---|"]
    lines += [f"| {o['part']} | {o['where']} | {o['primitive']} | {o['ms']} |" for o in result["ops_ms"][:top]]
    if result["unlabelled_ms"]:
        lines += ["", "Ops without metadata:", ""]
        lines += [f"- {u['ms']} ms `{u['op']}`: `{u['hlo']}`" for u in result["unlabelled_ms"][:top]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bench.unet_cpu import PRESETS

    if args.preset not in PRESETS or args.calls < 1:
        print(f"error: --preset one of {', '.join(PRESETS)}, --calls >= 1", file=sys.stderr)
        return 2
    result = profile(args.preset, args.mode, args.batch, args.calls)
    print(markdown(result, args.top), end="", flush=True)
    return 0


if __name__ == "__main__":
    answer_help_early(build_parser)
    sys.exit(main())
