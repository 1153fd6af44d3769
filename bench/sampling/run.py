"""Times our text -> images sampler and, with `--compare torch`, diffusers' pipeline; writes JSON + markdown.

Ours is `pipeline._sample_ids`, the one jitted program `generate` runs per batch (text encoder for the
prompt and the empty prompt, DDIM with classifier-free guidance as one loop, VAE decode), compiled
ahead of time so the compile is reported apart, followed by `to_uint8` on the host as `generate` does.
The prompts are token ids (the presets' stub tokenizer has no text; a --folder's tokenizer tokenizes
fixed captions), so both sides skip tokenization and encode the same ids.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bench import throughput
from bench.sampling.cli import build_parser
from bench.sampling.report import markdown
from dediffusion_jax.parallel.mesh import make_mesh, replicated
from dediffusion_jax.t2i import pipeline
from dediffusion_jax.t2i.folder import DecoderSpec, load_decoder

CAPTIONS = ("a red circle above a blue square", "two green triangles on the left", "a small yellow star")


def build_decoder(args: Any, mesh: Any) -> tuple[DecoderSpec, dict]:
    """(spec at the run's compute dtype, float32 params replicated over the mesh)."""
    if args.folder:
        spec, params = load_decoder(args.folder)
        params = jax.device_put(params, replicated(mesh))
    else:
        spec = throughput.decoder_spec(throughput.PRESETS[args.preset])
        params = throughput.random_decoder_params(spec, replicated(mesh))
    if spec.vae_config is None:
        raise SystemExit(f"{args.folder}: a pixel-space decoder; the benchmark (and diffusers' "
                         "StableDiffusionPipeline) needs a latent one with a VAE")
    return dataclasses.replace(spec, dtype=jnp.dtype(args.dtype)), params


def prompt_ids(spec: DecoderSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n, L] of n prompts, ids [L] of the empty prompt), as CLIP's tokenizer pads them."""
    tok = spec.tokenizer
    if not isinstance(tok, throughput.StubTokenizer):
        captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
        return pipeline.tokenize(spec, captions), pipeline.tokenize(spec, [""])[0]
    length = spec.context_length
    rng = np.random.default_rng(seed)
    ids = np.full((n + 1, length), tok.pad_token_id, np.int32)
    for row, words in zip(ids, [*rng.integers(3, length - 1, n), 0]):  # the last row: ""
        row[0], row[words + 1] = tok.bos_token_id, tok.eos_token_id
        row[1:words + 1] = rng.integers(1, min(tok.bos_token_id, tok.vocab_size), words)
    return ids[:n], ids[n]


@dataclasses.dataclass
class Inputs:
    """One batch, the same for both sides: prompt ids, empty-prompt ids, initial noise x_T (NHWC)."""
    ids: np.ndarray
    uncond: np.ndarray
    x_T: np.ndarray

    def head(self, k: int) -> "Inputs":
        """The first k examples (torch runs one device's batch of the same prompts and noise)."""
        return Inputs(self.ids[:k], self.uncond[:k], self.x_T[:k])


def make_inputs(spec: DecoderSpec, n: int, seed: int) -> Inputs:
    ids, empty = prompt_ids(spec, n, seed)
    x_T = np.asarray(pipeline.initial_noise(spec, seed, np.arange(n)))  # as `generate` draws it
    return Inputs(ids, np.broadcast_to(empty, ids.shape).copy(), x_T)


def time_ours(spec: DecoderSpec, params: dict, mesh: Any, inputs: Inputs, args: Any) -> tuple[dict, np.ndarray]:
    """Compile once, run --warmup untimed and --repeats timed batches; -> (row, float images [0, 1])."""
    n_dev, n = mesh.devices.size, len(inputs.ids)
    guided = args.guidance != 1.0
    batch_sh = NamedSharding(mesh, P("data"))
    ids, uncond, x_T = jax.device_put((inputs.ids, inputs.uncond if guided else None, inputs.x_T), batch_sh)
    rng = jax.device_put(pipeline.variance_keys(args.seed, np.arange(n)), batch_sh)  # unused at eta = 0
    start = time.perf_counter()
    compiled = pipeline._sample_ids.lower(spec, params, ids, uncond, x_T, rng, num_steps=args.ddim_steps,
                                          guidance_scale=float(args.guidance), eta=0.0).compile()
    compile_s = time.perf_counter() - start
    times, out = [], None
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        out = compiled(params, ids, uncond, x_T, rng)
        pipeline.to_uint8(out)  # on the host, as `generate` returns them
        times.append(time.perf_counter() - start)
    timed = times[args.warmup:]
    batch_s = statistics.median(timed)
    memory = compiled.memory_analysis()
    row = {"batch_per_device": n // n_dev, "global_batch": n, "compile_s": compile_s,
           "first_batch_s": times[0], "batch_ms": 1e3 * batch_s, "batch_ms_min": 1e3 * min(timed),
           "batch_ms_max": 1e3 * max(timed), "images_per_s": n / batch_s,
           "images_per_s_per_device": n / n_dev / batch_s, "timed_batches": len(timed),
           "xla_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
           "peak_bytes_in_use": throughput.peak_memory()}
    return row, np.clip(np.asarray(out, np.float32) / 2 + 0.5, 0.0, 1.0)


def parse_args(argv: list[str] | None) -> Any:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    args.batches = [int(b) for b in str(args.batch).split(",") if b]
    if args.repeats < 3:
        raise SystemExit(f"--repeats {args.repeats}: the median needs at least 3 timed batches")
    if args.guidance < 1.0:
        raise SystemExit(f"--guidance {args.guidance}: diffusers applies guidance only above 1; use >= 1")
    if args.dtype == "auto":
        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    devices = jax.devices()[: args.devices or None]
    mesh = make_mesh({"data": -1}, devices)
    spec, params = build_decoder(args, mesh)
    result: dict[str, Any] = {
        "decoder": args.folder or args.preset, "dtype": args.dtype, "ddim_steps": args.ddim_steps,
        "guidance_scale": args.guidance, "eta": 0.0, "image_size": spec.image_size,
        "command": "python -m bench.sampling " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": throughput.environment(devices),
        "params": {k: throughput.count(v) for k, v in params.items()}, "runs": [],
    }
    over = lambda: args.max_seconds and time.perf_counter() - start > args.max_seconds  # noqa: E731
    cases = []  # (batch per device, one device's inputs, our row, our images of them)
    for b in args.batches:
        row: dict[str, Any] = {"batch_per_device": b}
        inputs, images = make_inputs(spec, b * len(devices), args.seed), None
        if over():
            row["skipped"] = "time budget spent"
        else:
            try:
                row, images = time_ours(spec, params, mesh, inputs, args)
            except Exception as e:  # out of memory at one batch size must not end the run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        result["runs"].append(row)
        cases.append((b, inputs.head(b), row, None if images is None else images[:b]))
        print(json.dumps(row), flush=True)
    if args.compare == "torch":
        from bench.sampling import torch_side

        result["torch"] = torch_side.compare(spec, params, args, cases, over)
    result["total_seconds"] = time.perf_counter() - start
    throughput.write_outputs(result, markdown(result), Path(args.out) / "sampling")
    return result
