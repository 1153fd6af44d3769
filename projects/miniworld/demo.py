"""`make demo`: De-Diffusion on the miniature world, end to end, on a CPU in minutes.

    python -m projects.miniworld.demo --workdir workdirs/demo [--steps 600] [--eval-scenes 256]

1. loads the world's frozen text-to-image decoder (a committed diffusers-format folder, pre-trained by
   `python -m projects.miniworld.pretrain_decoder`; see its TRAINING.json);
2. trains the De-Diffusion encoder on world images alone (projects/miniworld/configs/world.py; resumes if the workdir
   already holds a checkpoint);
3. encodes held-out scenes (never seen by the decoder, the classifier or the encoder) to text;
4. redraws each scene with the frozen decoder from: the De-Diffusion text, the short one-object
   caption, the short caption + background, the full ground-truth caption (upper reference) and
   empty text (lower reference); scores the redrawings with the world's attribute classifier and
   world-FID; prints the table, text statistics and examples; writes results.json, results.md and
   a PNG grid (original | De-Diffusion | short caption | ...) into the workdir;
5. the paper's protocol: redraws the same texts with a THIRD-PARTY model the encoder never saw
   (assets/sd_world, a latent Stable Diffusion folder run through diffusers' PyTorch pipeline) over
   a guidance sweep, each source at its best scale, and the transfer loss per source.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from dediffusion_jax import errors

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
DECODER_DIR = HERE / "assets" / "decoder"
CONFIG_FILE = HERE / "configs" / "world.py"
THIRD_PARTY_DIR = HERE / "assets" / "sd_world"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m projects.miniworld.demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="workdirs/demo")
    p.add_argument("--config-arg", default="", help="argument of projects/miniworld/configs/world.py, e.g. tokens=8")
    # 600 steps and 12 DDIM steps: what fits the 15-minute budget from a fresh clone on a 2-core CPU
    # with a margin (2026-12-01, decoder v4, after a 1.3 min install: DDIM 12 12.4 min, DDIM 15 13.6,
    # DDIM 20 14.2, with the same metrics within 0.01 but world-FID; 800 steps with DDIM 25 took 16.3);
    # the config's own default is 1,000 (docs/miniworld.md).
    p.add_argument("--steps", type=int, default=600, help="training steps (0: the config's)")
    p.add_argument("--eval-scenes", type=int, default=256, help="held-out scenes to evaluate (of 364)")
    p.add_argument("--ddim-steps", type=int, default=12)
    p.add_argument("--cpu-devices", type=int, default=2,
                   help="on a CPU, split it into this many JAX devices (the batch is split between them; "
                        "0: one per core; the demo's figures were measured with 2). No effect on a GPU/TPU")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance; 3 binds attributes better (assets/decoder/README.md) "
                        "but doubles the evaluation time, which would break the 15-minute budget")
    p.add_argument("--decoder", default=str(DECODER_DIR))
    p.add_argument("--third-party", default=str(THIRD_PARTY_DIR),
                   help="the third-party text-to-image model (a Stable Diffusion folder run by diffusers); "
                        "'none' skips step 4")
    p.add_argument("--third-party-guidance", default="1,3",
                   help="its guidance sweep (the best per source is reported, as the paper does)")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p.parse_args(argv)


def _say(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The command; a user error (a bad path, file or value) is one `error: ...` line, status 2."""
    return errors.run_main(_cli, argv)


def _cli(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from dediffusion_jax import cpu_devices

    cpu_devices.split_cpu(args.cpu_devices)  # before JAX starts its backend
    start = time.time()
    workdir = Path(args.workdir).resolve()
    decoder_dir = Path(args.decoder)
    if not (decoder_dir / "model_index.json").is_file():
        print(
            f"error: the world's decoder is missing at {decoder_dir}. Pre-train it with\n"
            "  python -m projects.miniworld.pretrain_decoder --workdir workdirs/decoder\n"
            "  python -m projects.miniworld.pretrain_decoder --workdir workdirs/decoder "
            f"--export {decoder_dir}",
            file=sys.stderr,
        )
        return 2

    from projects.miniworld import captions, evaluator, scenes
    from dediffusion_jax.inference import TextEncoder
    from dediffusion_jax.train.cli import load_config_file
    from dediffusion_jax.train.loop import train_and_evaluate

    spec = f"{CONFIG_FILE}:{args.config_arg}" if args.config_arg else str(CONFIG_FILE)
    config = load_config_file(spec)
    with config.unlocked():
        config.decoder.path = str(decoder_dir)
        config.evals = {}  # the demo evaluates 256 scenes itself after training (step 3)
        if args.steps:
            config.total_steps = args.steps
            config.lr.warmup_steps = min(int(config.lr.warmup_steps), args.steps // 10)

    _say(f"[1/4] training De-Diffusion on world images ({config.total_steps} steps, batch "
         f"{config.batch_size}, {config.encoder.num_queries} tokens) in {workdir}")
    train_and_evaluate(config, workdir)

    _say(f"[2/4] encoding {args.eval_scenes} held-out scenes to De-Diffusion text")
    indices = scenes.evaluation_indices(args.eval_scenes)
    encoder = TextEncoder.from_checkpoint(workdir, batch_size=len(indices))  # one batch, as before
    config = encoder.config
    dd_texts = encoder.texts(scenes.images_of(indices))

    _say(f"[3/4] redrawing the scenes from each text ({args.ddim_steps} DDIM steps, guidance "
         f"{args.guidance}) and scoring them")
    dd_source = evaluator.TextsOfScenes(evaluator.DE_DIFFUSION, dict(zip(indices.tolist(), dd_texts)),
                                        key=f"encoder:{workdir}@step{config.total_steps}")
    shutil.rmtree(workdir / "world_eval", ignore_errors=True)  # always a fresh evaluation
    results = evaluator.evaluate(encoder.decoder, [dd_source, *evaluator.caption_sources()], indices,
                                 workdir / "world_eval", num_steps=args.ddim_steps,
                                 guidance_scale=args.guidance, progress=True)
    rows = evaluator.rows_of(results)
    short = evaluator.caption_sources()[1]
    stats = {
        "De-Diffusion text": evaluator.text_statistics(dd_texts, indices),
        "short caption": evaluator.text_statistics(short.texts([{"scene_index": i} for i in indices]), indices),
    }
    grid = workdir / "world_eval" / "grid.png"

    table = evaluator.markdown_table(results)
    lines = [
        f"Held-out scenes: {len(indices)}; decoder {decoder_dir}; {args.ddim_steps} DDIM steps, "
        f"guidance {args.guidance}; world-FID = Fréchet distance in the attribute classifier's "
        "feature space vs the original scenes.",
        "",
        table,
        "",
        "Attribute-word recall / precision of the text against the ground truth:",
        "",
        "| text | recall | precision | colour R | shape R | row R | col R | background R |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        lines.append(
            f"| {name} | {s['recall']:.3f} | {s['precision']:.3f} | {s['colours_recall']:.3f} | "
            f"{s['shapes_recall']:.3f} | {s['rows_recall']:.3f} | {s['cols_recall']:.3f} | "
            f"{s['backgrounds_recall']:.3f} |"
        )
    distinct = len(set(dd_texts))
    lines += ["", f"Distinct De-Diffusion texts: {distinct} of {len(dd_texts)} scenes"
              + (" (collapsed: the encoder writes one text for every image)" if distinct == 1 else ""),
              "", "Examples (ground truth | short caption | De-Diffusion text):", ""]
    for i in range(min(6, len(indices))):
        scene = scenes.scene_from_index(int(indices[i]))
        lines.append(f"- `{captions.full_caption(scene)}` | `{captions.short_caption(scene)}` | "
                     f"`{dd_texts[i]}`")
    third = _third_party(args, [dd_source, *evaluator.caption_sources()], indices, workdir, results)
    if third is not None:
        lines += ["", third["report"]]
    report = "\n".join(lines)
    _say("\n" + report + f"\n\nreconstruction grid: {grid}")
    (workdir / "results.md").write_text(report + "\n")
    (workdir / "results.json").write_text(json.dumps(
        {"rows": rows, "third_party": None if third is None else third["rows"], "text_statistics": stats,
         "texts": dd_texts[:32], "distinct_texts": distinct,
         "config": json.loads(config.to_json_best_effort()), "eval_scenes": len(indices),
         "ddim_steps": args.ddim_steps, "guidance": args.guidance}, indent=2) + "\n")
    _say(f"demo finished in {(time.time() - start) / 60:.1f} min")
    return 0


def _third_party(args: argparse.Namespace, sources: list, indices, workdir: Path,
                 own: dict) -> dict | None:
    """Step 4: the same texts through the third-party model; None when it is skipped."""
    from projects.miniworld import evaluator, third_party

    folder = Path(args.third_party)
    if args.third_party.lower() == "none" or not (folder / "model_index.json").is_file():
        _say(f"[4/4] skipped: no third-party model at {folder}")
        return None
    try:
        guidance = [float(g) for g in args.third_party_guidance.split(",") if g.strip()]
    except ValueError as e:
        raise errors.UserError(f"--third-party-guidance {args.third_party_guidance!r}: comma-separated "
                               "numbers") from e
    _say(f"[4/4] the paper's protocol: redrawing the same texts with the third-party model {folder.name} "
         f"(diffusers' StableDiffusionPipeline, {args.ddim_steps} DDIM steps, guidance {guidance})")
    generate, key = third_party.diffusers_renderer(folder, args.ddim_steps)
    shutil.rmtree(workdir / "third_party_eval", ignore_errors=True)
    results = evaluator.evaluate(None, sources, indices, workdir / "third_party_eval", num_steps=args.ddim_steps,
                                 guidance_scales=guidance, generate_fn=generate, generator_key=key, progress=True)
    rows = third_party.transfer_rows(own, results)
    report = "\n".join([
        f"Redrawn by the third-party model ({folder.name}: latent diffusion, run by diffusers; the encoder "
        "never saw it), each source at its best guidance, and the transfer loss (training decoder minus "
        "third-party; the training decoder at guidance " + own["guidance_scales"][0] + "):", "",
        third_party.transfer_table(rows), "", third_party.sweep_table(results, "Guidance sweep")])
    return {"rows": rows, "report": report}


if __name__ == "__main__":
    sys.exit(main())
