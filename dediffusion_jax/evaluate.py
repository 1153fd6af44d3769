"""The paper's reconstruction-FID protocol from the command line (resumable).

    python -m dediffusion_jax.evaluate \
        --images tfds:coco_captions/2014:validation@/data/tfds --num-images 30000 \
        --decoder /models/stable-diffusion-2-base --inception inception_fid.safetensors \
        --checkpoint De-Diffusion=/runs/dd_vitl --captions longest,random,concat \
        --texts BLIP-2=blip2.jsonl --workdir /runs/eval_recon

Texts come from De-Diffusion checkpoints (--checkpoint), the dataset's captions (--captions) and
any other captioner's JSONL ({"id", "text"} per line, --texts); the decoder folder is run by the
project's Flax pipeline (default) or diffusers' PyTorch StableDiffusionPipeline (--backend torch),
DDIM --steps (50), one FID and one KID per guidance scale of --guidance (1.5,2,3,4,5,6,7,8), and
with --clip FOLDER the CLIP score of each generated image against its text. Writes
WORKDIR/results.json, results.md (the paper-shaped table) and grid*.png. Rerunning the same command
resumes: finished shards are skipped. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dediffusion_jax import errors


def _named(value: str, default_name: str) -> tuple[str, str]:
    """'NAME=PATH' or 'PATH' -> (name, path)."""
    if "=" in value and not os.path.exists(value):
        name, path = value.split("=", 1)
        return name.strip() or default_name, path
    return default_name, value


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.replace(" ", "").split(",") if x]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from dediffusion_jax.evaluation import reconstruction as rc

    p = argparse.ArgumentParser(prog="python -m dediffusion_jax.evaluate",
                                description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True,
                   help="source images: tfds:coco_captions/2014:validation[@DATA_DIR], a folder, "
                        "or arrayrecord:GLOB")
    p.add_argument("--num-images", type=int, default=None,
                   help=f"use the first N images (the paper: {rc.PAPER_NUM_IMAGES}); default all")
    p.add_argument("--decoder", required=True, help="diffusers-format text-to-image folder")
    p.add_argument("--backend", choices=("flax", "torch"), default="flax",
                   help="flax: our sharded pipeline; torch: diffusers StableDiffusionPipeline")
    p.add_argument("--workdir", required=True, help="output and resume folder")
    p.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]PATH",
                   help="a De-Diffusion training workdir or WORKDIR/checkpoints/STEP (repeatable)")
    p.add_argument("--captions", action="append", default=[], metavar="MODES",
                   help="caption baselines: comma list of longest,random,concat")
    p.add_argument("--caption-seed", type=int, default=0, help="seed of the random caption")
    p.add_argument("--texts", action="append", default=[], metavar="[NAME=]FILE.jsonl",
                   help='texts of another captioner, lines {"id": ..., "text": ...} (repeatable)')
    p.add_argument("--guidance", type=_floats,
                   default=list(rc.PAPER_GUIDANCE_SCALES), help="comma list of guidance scales")
    p.add_argument("--steps", type=int, default=rc.PAPER_NUM_STEPS, help="DDIM steps")
    p.add_argument("--inception", help="FID InceptionV3 weights (.safetensors, made by "
                                       "python -m dediffusion_jax.evaluation.convert_inception)")
    p.add_argument("--resolution", type=int, default=rc.PAPER_RESOLUTION)
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    p.add_argument("--encode-batch-size", type=int, default=32)
    p.add_argument("--extract-batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1000, help="images per resumable shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--reference-cache", help="folder caching reference statistics "
                                             "(default WORKDIR/reference_cache)")
    p.add_argument("--kid-subsets", type=int, default=100,
                   help="KID: number of random subsets (clean-fid / torch-fidelity: 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000,
                   help="KID: images per subset, capped by the image count (default 1000)")
    p.add_argument("--clip", metavar="FOLDER",
                   help="also report the CLIP score: a local transformers CLIPModel folder "
                        "(safetensors, preprocessor_config.json; run by PyTorch)")
    p.add_argument("--clip-tokenizer", metavar="FOLDER",
                   help="the CLIP tokenizer's folder when --clip's folder has none")
    p.add_argument("--grid-rows", type=int, default=8)
    p.add_argument("--max-shards", type=int, default=None,
                   help="stop after computing this many new shards (rerun to continue)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    args = p.parse_args(argv)
    if not (args.checkpoint or args.captions or args.texts):
        p.error("give at least one text source: --checkpoint, --captions or --texts")
    modes = [m for c in args.captions for m in c.replace(" ", "").split(",") if m]
    bad = [m for m in modes if m not in ("longest", "random", "concat")]
    if bad:
        p.error(f"unknown caption mode(s) {bad}; choose from longest, random, concat")
    args.caption_modes = list(dict.fromkeys(modes))
    if not args.guidance:
        p.error("--guidance needs at least one scale")
    for flag in ("steps", "batch_size", "shard_size", "resolution", "encode_batch_size",
                 "kid_subsets"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.kid_subset_size < 2:
        p.error("--kid-subset-size must be >= 2")
    if args.clip_tokenizer and not args.clip:
        p.error("--clip-tokenizer needs --clip FOLDER")
    return args


def main(argv: list[str] | None = None, *, extractor: Any = None) -> int:
    """CLI entry point. `extractor` (Python callers only) replaces --inception, e.g. in tests.
    A user error (a bad path, checkpoint, decoder, texts file) is one `error: ...` line, status 2."""
    return errors.run_main(lambda a: _main(a, extractor), argv)


def _main(argv: list[str], extractor: Any) -> int:
    args = _parse(argv)
    import jax.numpy as jnp

    from dediffusion_jax import encode
    from dediffusion_jax.data.sources import source_from_spec
    from dediffusion_jax.evaluation import reconstruction as rc
    from dediffusion_jax.evaluation import text_sources as ts

    if extractor is None:
        if not args.inception:
            print("error: --inception PATH.safetensors is required (the standard FID network); "
                  "see docs/evaluation.md for converting pytorch-fid's weights", file=sys.stderr)
            return 2
        from dediffusion_jax.evaluation.inception import load_inception

        extractor = load_inception(args.inception)  # a bad file: WeightsError, one line
    mesh = encode.default_mesh()
    start = time.perf_counter()
    try:
        source = source_from_spec(args.images)
        sources: list[Any] = []
        for spec in args.checkpoint:
            name, path = _named(spec, "De-Diffusion")
            sources.append(ts.from_checkpoint(path, name=name,
                                              batch_size=args.encode_batch_size, mesh=mesh))
        for mode in args.caption_modes:
            sources.append(ts.CaptionTexts(mode, seed=args.caption_seed))
        for spec in args.texts:
            name, path = _named(spec, "")
            sources.append(ts.JsonlTexts(path, name=name or None))
        decoder, generate_fn, generator_key = None, None, None
        if args.backend == "torch":
            generate_fn = rc.torch_generate_fn(args.decoder, args.steps,
                                               batch_size=args.batch_size)
            generator_key = f"torch:{os.path.abspath(args.decoder)}:steps={args.steps}"
        else:
            from dediffusion_jax.t2i.folder import load_decoder

            decoder = load_decoder(args.decoder, dtype=getattr(jnp, args.dtype))
        results = rc.run_protocol(
            source, sources, decoder, args.guidance, args.steps, extractor, args.workdir,
            num_images=args.num_images, shard_size=args.shard_size, seed=args.seed,
            batch_size=args.batch_size, mesh=mesh, resolution=args.resolution,
            generate_fn=generate_fn, generator_key=generator_key,
            source_key=f"{args.images}", reference_cache_dir=args.reference_cache,
            extract_batch_size=args.extract_batch_size, grid_rows=args.grid_rows,
            max_shards=args.max_shards, progress=not args.no_progress,
            kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
            clip=args.clip, clip_tokenizer=args.clip_tokenizer)
    except rc.ProtocolStopped as e:
        print(f"{e} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
        return 0
    except (KeyError, ValueError) as e:  # a bad --texts file, --images spec, ... (user errors)
        if args.debug:
            raise
        print(f"error: {errors.message(e)}", file=sys.stderr)
        return 2
    from dediffusion_jax.evaluation.report import KID_LABEL, format_kid

    best = ", ".join(f"{r['name']}: {r['best_fid']:.2f} @ {r['best_guidance']} "
                     f"({KID_LABEL} {format_kid(r.get('kid_at_best'))})"
                     for r in results["sources"] if r["best_fid"] is not None)
    print(f"done in {time.perf_counter() - start:.1f}s; best FID per source: {best}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
