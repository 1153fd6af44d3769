"""Where De-Diffusion text loses in transfer: the same texts, edited one way each, through sd_world.

    python -m projects.miniworld.transfer_diagnosis --run workdirs/ablations/runs/x4_steps2400_seed0 \
        --workdir workdirs/transfer_diagnosis/x4_seed0

The ablation protocol (docs/ablations.md) scores a run's texts through the third-party model; there
the 2,400-step texts win on objects and draw level with the short caption on world-FID. This command
asks which property of the texts costs world-FID in transfer, by redrawing edited copies of the run's
own texts with the protocol's settings (its halves, DDIM steps and guidance sweep; guidance chosen on
the select half by objects, reported on the report half):

- `as written`: the texts unchanged (the protocol's number, recomputed);
- `repeats removed`: each word kept once, in its first place (`triangle bottom bottom triangle` ->
  `triangle bottom`): sd_world saw word soups in 15% of its captions, repeated words rarely.

Each edit is a diagnosis, not a text source of the method: the comparison of docs/ablations.md stays
the texts as written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dediffusion_jax import errors
from dediffusion_jax.cli_flags import answer_help_early

EDITS = ("as written", "repeats removed")


def remove_repeats(text: str) -> str:
    """Each word once, in the place it first appears."""
    seen: set[str] = set()
    kept = []
    for word in text.split():
        if word not in seen:
            seen.add(word)
            kept.append(word)
    return " ".join(kept)


def edited(texts: dict[int, str], edit: str) -> dict[int, str]:
    if edit == "as written":
        return dict(texts)
    if edit == "repeats removed":
        return {i: remove_repeats(t) for i, t in texts.items()}
    raise ValueError(f"unknown edit {edit!r}; one of {EDITS}")


def repeat_statistics(texts: list[str]) -> dict[str, float]:
    """Mean words per text, mean distinct words, and the share of texts with a repeated word."""
    words = [t.split() for t in texts]
    return {"words": round(sum(map(len, words)) / len(words), 2),
            "distinct_words": round(sum(len(set(w)) for w in words) / len(words), 2),
            "texts_with_repeats": round(sum(len(set(w)) < len(w) for w in words) / len(words), 3)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m projects.miniworld.transfer_diagnosis",
                                description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="an ablation run folder (with train/), e.g. "
                                                "workdirs/ablations/runs/x4_steps2400_seed0")
    p.add_argument("--workdir", required=True, help="where the redrawings and the table go (resumable)")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


def diagnose(run: Path, workdir: Path) -> dict[str, Any]:
    import numpy as np

    from dediffusion_jax.inference import TextEncoder
    from projects.miniworld import ablations, evaluator, scenes

    if not (run / "train").is_dir():
        raise errors.UserError(f"{run} has no train/ folder: expected an ablation run folder")
    protocol = ablations.FULL
    halves = protocol.halves()
    indices = np.concatenate(list(halves.values()))
    encoder = TextEncoder.from_checkpoint(run / "train", batch_size=len(indices))
    texts = dict(zip(indices.tolist(), encoder.texts(scenes.images_of(indices))))
    sources = [evaluator.TextsOfScenes(edit, edited(texts, edit), key=f"{encoder.key}:{edit}") for edit in EDITS]
    scores = {}
    generate, key = ablations.Renderers(protocol).third_party()
    for half, idx in halves.items():
        scores[half] = ablations._metrics(evaluator.evaluate(
            None, sources, idx, workdir / f"third_party_{half}", num_steps=protocol.ddim_steps,
            guidance_scales=protocol.third_guidance, generate_fn=generate, generator_key=key, progress=True))
    report = [texts[int(i)] for i in halves["report"]]
    rows = {}
    for edit in EDITS:
        chosen = ablations.chosen({h: scores[h][edit] for h in scores})
        rows[edit] = {**chosen,
                      **repeat_statistics([edited(dict(enumerate(report)), edit)[j] for j in range(len(report))])}
    out = {"run": str(run), "protocol": {"ddim_steps": protocol.ddim_steps, "guidance": protocol.third_guidance,
                                         "scenes": protocol.scenes}, "rows": rows, "scores": scores}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "diagnosis.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| texts | objects | colour | shape | occupancy | background | world-FID | world-KID x10^3 | words / distinct | with repeats | w |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for edit, r in rows.items():
        kid = "—" if r.get("world_kid") is None else f"{1e3 * r['world_kid']:.1f}"
        lines.append(f"| {edit} | {r['object']:.3f} | {r['colour']:.3f} | {r['shape']:.3f} | {r['occupancy']:.3f} | "
                     f"{r['background']:.3f} | {r['world_fid']:.1f} | {kid} | {r['words']} / {r['distinct_words']} | "
                     f"{r['texts_with_repeats']:.2f} | {r['guidance']} |")
    (workdir / "diagnosis.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """The command (one `error: ...` line for a user error)."""
    return errors.run_main(_cli, argv)


def _cli(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    diagnose(Path(args.run), Path(args.workdir))
    return 0


if __name__ == "__main__":
    answer_help_early(build_parser)
    sys.exit(main())
