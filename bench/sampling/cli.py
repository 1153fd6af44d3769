"""The command line of `python -m bench.sampling` (standard library only: --help imports no jax)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Text -> images throughput: our sampler (dediffusion_jax/t2i/pipeline.py, the jitted program behind
`generate`: text encoder, DDIM with classifier-free guidance, VAE decode, images to the host) on every
device JAX finds, and with `--compare torch` diffusers' StableDiffusionPipeline built in memory from
the SAME weights (convert.flax_to_torch), DDIMScheduler from the same schedule, the same prompt ids
and the same initial noise, on one device of the same kind.

    python -m bench.sampling --preset sd2-base --batch 16 --compare torch --out /tmp/bench   # GPU
    python -m bench.sampling --tiny --compare torch --out /tmp/bench                         # CPU, CI
    python -m bench.sampling --folder projects/miniworld/assets/sd_world --compare torch      # a real folder

Weights are random for the presets (bench/throughput.py's SD2-base and tiny decoders; nothing
downloads), or a diffusers folder's with --folder. Reported per batch size: compile seconds (ours;
torch has none: eager), the first untimed batch, then the median over --repeats timed batches:
ms per batch, images/s, images/s per device, peak device memory (where the backend reports it).
Where both sides run in float32, the first torch batch's images are compared with ours (same noise,
eta = 0): the parity figures. Writes OUT/sampling.json and OUT/sampling.md.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.sampling", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd2-base", choices=("sd2-base", "tiny"))  # = throughput.PRESETS
    p.add_argument("--tiny", action="store_true", help="= --preset tiny (CPU, CI)")
    p.add_argument("--folder", default="", help="a diffusers Stable Diffusion folder instead of a preset")
    p.add_argument("--batch", default="8", help="comma-separated batch sizes PER DEVICE")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5,
                   help="classifier-free guidance scale (> 1: the UNet runs on prompt and empty prompt)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="compute dtype (params stay float32); auto: float32 on CPU, bfloat16 elsewhere")
    p.add_argument("--repeats", type=int, default=3, help="timed batches (median reported; at least 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches after compilation")
    p.add_argument("--devices", type=int, default=0, help="use the first N devices (0: all)")
    p.add_argument("--seed", type=int, default=0, help="initial noise and prompt ids")
    p.add_argument("--compare", default="", choices=("", "torch"),
                   help="torch: also time diffusers' StableDiffusionPipeline from the same weights")
    p.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="skip what is left (batch sizes, then torch) once this much time has passed (0: no limit)")
    p.add_argument("--out", default="bench_out")
    return p
