"""One point of an encoder sweep on the miniature world: train briefly, then score the text cheaply.

Sampling reconstructions costs minutes; this scores a run in seconds instead, with two measures that
need no sampling: the teacher-forced decoder loss of its texts (miniworld.probe, against the short
caption, short + background and full caption on the same (t, noise) draws) and the attribute-word
recall of its texts. It produced the table "Tuning the encoder" in docs/miniworld.md:

    python projects/miniworld/bench/encoder_sweep.py --name v3t05div10 --steps 500 \
        --config-arg diversity=0.1 --set "loss.timestep_range=(0.5,1.0)"

Scenes: the first 256 of `scenes.evaluation_indices()`, sorted; the probe uses the first 128 of those.
Each run appends one JSON line to --out and prints it. About 5.5 min per 500-step run on 2 cores.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "world.py"

from dediffusion_jax.train.cli import load_config_file  # noqa: E402  (light: no jax)


def apply_override(config, assignment: str) -> None:
    """'a.b=value' with a Python literal value, e.g. 'quantizer.hard=False', 'lr.peak=3e-3'."""
    key, _, text = assignment.partition("=")
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    old = node[last]
    value = text if isinstance(old, str) else ast.literal_eval(text)
    node[last] = type(old)(value) if not isinstance(old, (tuple, list)) else tuple(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--config-arg", default="", help="argument of projects/miniworld/configs/world.py, e.g. diversity=0.1")
    p.add_argument("--set", action="append", default=[], help="config override a.b=literal (repeatable)")
    p.add_argument("--root", default="workdirs/sweep", help="the run's workdir is ROOT/NAME")
    p.add_argument("--out", default="workdirs/sweep/results.jsonl")
    args = p.parse_args(argv)
    # Heavy imports after the arguments: `--help` starts nothing.
    import numpy as np

    from dediffusion_jax.train.loop import train_and_evaluate
    from projects.miniworld import captions, evaluator, probe, scenes

    spec = str(CONFIG_FILE) + (f":{args.config_arg}" if args.config_arg else "")
    config = load_config_file(spec)
    with config.unlocked():
        config.total_steps = args.steps
        config.lr.warmup_steps = min(int(config.lr.warmup_steps), args.steps // 10)
        for assignment in args.set:
            apply_override(config, assignment)
    workdir = Path(args.root) / args.name
    start = time.time()
    train_and_evaluate(config, workdir)

    indices = np.sort(scenes.evaluation_indices(256))
    decoder, by_scene = probe.de_diffusion_texts(workdir, indices)
    texts = list(by_scene.values())
    stats = evaluator.text_statistics(texts, indices)
    loss = probe.probe(decoder, indices[:128], {
        "dd": by_scene.__getitem__,
        "short": captions.short_caption,
        "short+bg": captions.short_caption_with_background,
        "full": captions.full_caption,
    }, draws=8)
    result = {
        "name": args.name, "config_arg": args.config_arg, "set": args.set, "steps": args.steps,
        "minutes": round((time.time() - start) / 60, 1),
        "stats": {k: round(v, 3) for k, v in stats.items()},
        "probe": {k: round(v, 4) for k, v in loss.items()},
        "distinct": len(set(texts)), "examples": texts[:4],
    }
    print("RESULT", json.dumps(result), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
