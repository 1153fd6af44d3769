"""The fused vocabulary-head op (models/quantizer.py) per chunk size: time, XLA memory and FLOPs.

    python -m bench.vocab_head --preset paper --chunks 16,32,64,auto,150,all --repeats 5
    python -m bench.vocab_head --preset world --chunks 16,32,64,128,auto --repeats 9
    python -m bench.vocab_head --preset paper --step --chunks 16,auto,all --repeats 3

Times forward + backward of `fused_soft_token_embeddings` (jitted `value_and_grad` of a linear loss
w.r.t. the features, the head's kernel and bias, as the train step takes them; hard straight-through
tokens by default, E frozen) for each `--chunks` value (rows per chunk; `all` = one chunk, `auto` = the
default rule, `auto_rows_per_chunk`). The repeats are interleaved (A B C A B C ...) and the median is
reported, so a machine busy with something else slows every variant alike. Per value: the rows a chunk
holds, median / min ms, XLA's peak temporaries (`memory_analysis().temp_size_in_bytes`), what the op
adds to the temporaries of a program where a stand-in decoder sits between its forward and backward
("beside a decoder"), XLA's FLOPs (a loop body counted once) and the FLOPs with each loop body
counted as many times as it runs (`dediffusion_jax.loop_flops`, what the trainer logs). `--step`
compiles and times a whole train step instead (bench.throughput's tiny decoder with this vocabulary,
queries, pooler width and images; its steps are timed one value after the other). Presets: paper =
4 images x 75 queries, width 1024, V = 49,408, E [V, 1024] (OpenCLIP-H); world = 32 images x 12
queries, width 128, V = 606, E [V, 128]. `--json FILE` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# `python bench/vocab_head.py` as well as `python -m bench.vocab_head`: the repo root on the path.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {  # images, queries per image, pooler width, vocabulary, text-encoder width
    "paper": dict(images=4, queries=75, width=1024, vocab=49_408, dim=1024),
    "world": dict(images=32, queries=12, width=128, vocab=606, dim=128),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.vocab_head", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="paper", choices=tuple(PRESETS))
    for name in ("images", "queries", "width", "vocab", "dim"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the preset's value")
    p.add_argument("--chunks", default="16,32,64,128,all,auto",
                   help="comma-separated rows per chunk; all = one chunk, auto = the default rule")
    p.add_argument("--budget-mb", type=float, default=None, help="auto's budget (default: the op's)")
    p.add_argument("--soft", action="store_true", help="soft tokens instead of straight-through hard")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each value (median reported)")
    p.add_argument("--step", action="store_true",
                   help="instead: the whole (tiny) train step per value: XLA temp, FLOPs, step ms")
    p.add_argument("--json", default="", help="also write the rows to this file")
    return p


if __name__ == "__main__":  # --help answers before jax is imported
    from dediffusion_jax.cli_flags import answer_help_early

    answer_help_early(build_parser)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dediffusion_jax import loop_flops  # noqa: E402
from dediffusion_jax.models import quantizer as q  # noqa: E402


def _chunking(value: str, rows: int, vocab: int, budget_mb: float) -> tuple[int, dict]:
    """A --chunks value -> (the op's rows_per_chunk argument, the row's chunks / rows_per_chunk /
    loop_trips fields)."""
    chunk = rows if value == "all" else 0 if value == "auto" else int(value)
    resolved = min(chunk or q.auto_rows_per_chunk(rows, vocab, budget_mb), rows)
    return chunk, {"chunks": value, "rows_per_chunk": resolved, "loop_trips": -(-rows // resolved)}


def _stand_in_decoder(out, w):
    """A consumer of the op's output whose activations stay alive for its backward, like the decoder's:
    four levels of [rows, 16384] float32."""
    h = out @ w
    for _ in range(4):
        h = jnp.sin(h) * h
    return jnp.sum(h)


def beside_decoder_mb(loss, features, kernel, bias) -> float:
    """XLA temp MB the op adds to a program where a stand-in decoder sits between its forward and its
    backward: what the op costs at the step's peak (its temporaries, and anything XLA keeps from its
    forward or hoists from its backward across the decoder)."""
    w = jax.ShapeDtypeStruct((loss.dim, 16384), jnp.float32)
    temp = lambda f, *a: jax.jit(f).lower(*a).compile().memory_analysis().temp_size_in_bytes  # noqa: E731
    both = temp(jax.grad(lambda x, k, b, w: _stand_in_decoder(loss.op(x, k, b), w), argnums=(0, 1, 2)),
                features, kernel, bias, w)
    out = jax.ShapeDtypeStruct((*features.shape[:-1], loss.dim), jnp.float32)
    alone = temp(jax.grad(_stand_in_decoder), out, w)
    return (both - alone) / 1e6


def measure(shape: dict, chunks: list[str], hard: bool = True, repeats: int = 5,
            budget_mb: float | None = None) -> list[dict]:
    """One row per `chunks` value: rows_per_chunk, ms (median, min), temp MB, FLOPs (XLA, counted)."""
    images, queries, width, vocab, dim = (shape[k] for k in ("images", "queries", "width", "vocab", "dim"))
    rows = images * queries
    keys = jax.random.split(jax.random.key(0), 5)
    features = jax.random.normal(keys[0], (images, queries, width))
    kernel = jax.random.normal(keys[1], (width, vocab)) * width ** -0.5
    bias = jnp.zeros((vocab,))
    table = jax.random.normal(keys[2], (vocab, dim)) * 0.02
    target = jax.random.normal(keys[3], (images, queries, dim))
    mask = np.zeros(vocab, bool)
    mask[: vocab // 20] = True  # ~5% excluded, like CLIP's punctuation
    budget = q.CHUNK_BUDGET_MB if budget_mb is None else budget_mb
    results, fns = [], []
    for value in chunks:
        chunk, fields = _chunking(value, rows, vocab, budget)

        def op(x, k, b, chunk=chunk):
            return q.fused_soft_token_embeddings(x, k, b, mask, keys[4], 1.0, hard, table,
                                                 rows_per_chunk=chunk, chunk_budget_mb=budget)

        def loss(x, k, b, op=op):
            return jnp.sum(op(x, k, b) * target)

        loss.op, loss.dim = op, dim

        jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        traced = jitted.trace(features, kernel, bias)
        start = time.perf_counter()
        compiled = traced.lower().compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis()
        xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost).get("flops", 0.0))
        results.append({**fields, "compile_s": compile_s,
                        "temp_MB": compiled.memory_analysis().temp_size_in_bytes / 1e6,
                        "xla_GFLOP": xla / 1e9,
                        "counted_GFLOP": loop_flops.corrected_flops(traced.jaxpr, xla) / 1e9, "ms": []})
        results[-1]["beside_decoder_MB"] = beside_decoder_mb(loss, features, kernel, bias)
        jax.block_until_ready(compiled(features, kernel, bias))  # warm-up
        fns.append(compiled)
    for _ in range(repeats):  # interleaved: A B C A B C ...
        for row, fn in zip(results, fns):
            start = time.perf_counter()
            jax.block_until_ready(fn(features, kernel, bias))
            row["ms"].append(1e3 * (time.perf_counter() - start))
    for row in results:
        times = row.pop("ms")
        row.update(ms_median=statistics.median(times), ms_min=min(times), repeats=len(times))
    return results


def measure_step(shape: dict, chunks: list[str], steps: int = 3,
                 budget_mb: float | None = None) -> list[dict]:
    """The same chunk values in a whole train step: bench.throughput's tiny De-Diffusion step (tiny ViT,
    text encoder (width 32, so E is [V, 32] whatever `dim`), UNet and VAE; float32, Adafactor, one CPU
    device) with this shape's vocabulary, queries, pooler width and images. Per value: XLA's temp MB of
    the compiled step, its FLOPs (XLA's and counted) and the median step ms."""
    import dataclasses

    from bench import throughput as tp
    from dediffusion_jax.parallel.mesh import make_mesh, replicated

    images, queries, width, vocab = (shape[k] for k in ("images", "queries", "width", "vocab"))
    text = {**tp.TINY_TEXT, "vocab_size": vocab, "max_position_embeddings": max(16, queries + 2),
            "bos_token_id": vocab - 2, "eos_token_id": vocab - 1}
    encoder = dict(tp.PRESETS["tiny"].encoder)
    encoder["encoder"] = {**encoder["encoder"], "num_queries": queries, "pooler_width": width}
    preset = tp.Preset(text, tp.TINY_UNET, tp.TINY_VAE, tp.SD2_BASE_SCHEDULER, encoder)
    spec = tp.decoder_spec(preset)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    decoder_params = tp.random_decoder_params(spec, replicated(mesh))
    setup = tp.make_setup(preset, spec, decoder_params, "float32", False, mesh)
    base, rows, results = setup.model, images * queries, []
    budget = q.CHUNK_BUDGET_MB if budget_mb is None else budget_mb
    for value in chunks:
        chunk, fields = _chunking(value, rows, vocab, budget)
        setup.model = dataclasses.replace(base, rows_per_chunk=chunk, chunk_budget_mb=budget)
        run = tp.time_one(setup, images, "step", steps=steps, warmup=1)
        results.append({**fields, "step_ms": run["step_ms"],
                        "temp_MB": run["xla_memory"].get("temp_size_in_bytes", 0) / 1e6,
                        "xla_GFLOP": (run["xla_flops_per_step_per_device"] or 0) / 1e9,
                        "counted_GFLOP": (run["flops_per_step_per_device"] or 0) / 1e9})
    return results


OP_COLUMNS = (("fwd+bwd ms (median)", "ms_median", ".0f"), ("min ms", "ms_min", ".0f"),
              ("XLA temp MB", "temp_MB", ".1f"), ("beside a decoder MB", "beside_decoder_MB", ".1f"),
              ("XLA GFLOP", "xla_GFLOP", ".2f"), ("counted GFLOP", "counted_GFLOP", ".2f"))
STEP_COLUMNS = (("step ms (median)", "step_ms", ".0f"), ("XLA temp MB", "temp_MB", ".1f"),
                ("XLA GFLOP", "xla_GFLOP", ".2f"), ("counted GFLOP", "counted_GFLOP", ".2f"))


def table(title: str, results: list[dict], columns: tuple) -> str:
    """A markdown table: rows_per_chunk, chunks, then `columns` ((header, key, format), ...)."""
    lines = [title, "| rows_per_chunk | chunks | " + " | ".join(c[0] for c in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for r in results:
        name = {"all": f"{r['rows_per_chunk']} (one chunk)",
                "auto": f"auto = {r['rows_per_chunk']}"}.get(r["chunks"], str(r["rows_per_chunk"]))
        cells = [format(r[key], fmt) for _, key, fmt in columns]
        lines.append(f"| {name} | {r['loop_trips']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    shape = dict(PRESETS[args.preset])
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k) is not None})
    chunks = [c.strip() for c in args.chunks.split(",") if c.strip()]
    if args.step:
        results = measure_step(shape, chunks, steps=args.repeats, budget_mb=args.budget_mb)
        title = (f"the tiny train step at {shape['images']} images x {shape['queries']} queries, "
                 f"pooler width {shape['width']}, V = {shape['vocab']:,}")
        print(table(title, results, STEP_COLUMNS))
    else:
        results = measure(shape, chunks, hard=not args.soft, repeats=args.repeats, budget_mb=args.budget_mb)
        title = (f"{shape['images'] * shape['queries']} rows (= {shape['images']} x {shape['queries']}), "
                 f"width {shape['width']}, V = {shape['vocab']:,}, E [V, {shape['dim']}]")
        print(table(title, results, OP_COLUMNS))
    timing = (f"median of {args.repeats} steps after 1 warm-up step, one value after the other" if args.step
              else f"{'soft' if args.soft else 'hard'} tokens, median of {args.repeats} interleaved repeats")
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {timing}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "rows": results}, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
