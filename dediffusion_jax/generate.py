"""Text -> PNGs with a diffusers-format decoder folder, run by the project's Flax pipeline.

    python -m dediffusion_jax.generate --decoder DIR --prompt "a red circle" [--prompt ...]
        [--prompt-file F] [--steps 50] [--guidance 3.0] [--seed 0] [--batch-size 16] --out DIR

Files are named by prompt index (00000.png, ...) with the prompts listed in OUT/prompts.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dediffusion_jax import errors


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dediffusion_jax.generate", description=__doc__.splitlines()[0]
    )
    p.add_argument("--decoder", required=True, help="diffusers-format folder (model_index.json, ...)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--prompt-file", help="a text file with one prompt per line")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    args = p.parse_args(argv)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            p.error(f"--prompt-file {path} does not exist")
        args.prompt += [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not args.prompt:
        p.error("give at least one --prompt or a --prompt-file")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """A user error (a bad decoder folder, an unwritable --out) is one `error: ...` line, status 2."""
    return errors.run_main(_main, argv)


def _main(argv: list[str]) -> int:
    args = _parse(argv)
    import jax
    import jax.numpy as jnp
    from PIL import Image

    from dediffusion_jax.parallel.mesh import make_mesh
    from dediffusion_jax.t2i import pipeline
    from dediffusion_jax.t2i.folder import load_decoder

    decoder = load_decoder(args.decoder, dtype=getattr(jnp, args.dtype))
    mesh = make_mesh({"data": -1}) if jax.device_count() > 1 else None
    print(
        f"decoder {decoder.path} ({'latent' if decoder.is_latent else 'pixel'}, "
        f"{decoder.image_size}px); {len(args.prompt)} prompts; {args.steps} DDIM steps, "
        f"guidance {args.guidance}; {jax.device_count()} device(s)",
        flush=True,
    )
    start = time.perf_counter()
    images = pipeline.generate(
        decoder,
        args.prompt,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        eta=args.eta,
        batch_size=args.batch_size,
        mesh=mesh,
        progress=True,
    )
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(out / f"{i:05d}.png")
    (out / "prompts.txt").write_text("\n".join(args.prompt) + "\n")
    print(f"wrote {len(images)} images to {out} in {seconds:.1f} s (compile included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
