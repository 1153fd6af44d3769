"""The world's few-shot evaluation: held-out scenes, as text, through the world LLM (issue 20).

    python -m projects.miniworld.fewshot_eval --checkpoint workdirs/demo/checkpoints/600 \
        --out workdirs/fewshot_world --half report [--llm projects/miniworld/assets/llm] [--shots 0,1,4]

Writes the inputs of the core command (`python -m dediffusion_jax.fewshot`) and runs it twice:
- OUT/texts/*.jsonl: every scene's text from each source ({"id": scene index, "text"}): the
  De-Diffusion text of the encoder (`TextEncoder.from_checkpoint`), the short caption, the short
  caption + background, the full caption (upper reference); the blank query is the lower one;
- OUT/vqa_questions.jsonl: one question of each type (`fewshot_tasks.QUESTION_TYPES`) per held-out
  scene of the chosen half (split "eval"), and one question on each of 1,000 train scenes (the
  support pool, split "train");
- OUT/kinds.jsonl: the scene kind of every held-out scene of the half (eval) and every train scene;
- OUT/vqa/ and OUT/classify/: results.json, results.md, predictions.jsonl of the core command
  (VQA at each --shots; 5-way 1-shot naming of scene kinds with and without task induction);
- OUT/classify/names.json and .md: per source and setting, the accuracy and the share of answers
  that are one of the episode's five names (a model that never learned to copy a name from the
  support answers names from elsewhere: the diagnosis of the first world LLM), and the accuracy
  apart for queries whose scene has one object kind and two (a model that matches only one-kind
  scenes, recipe 4's, scores above chance on the first and at chance on the second).

Halves: the held-out scenes in `scenes.evaluation_indices()` order; `tune` is the first half (choose
settings there), `report` the second (the numbers in docs/fewshot.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dediffusion_jax import errors
from dediffusion_jax.cli_flags import answer_help_early

DE_DIFFUSION = "De-Diffusion text"
CAPTION_SOURCES = ("short caption", "short caption + background", "full caption (upper ref.)")
SUPPORT_SCENES = 1000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m projects.miniworld.fewshot_eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--checkpoint", required=True, help="the De-Diffusion encoder: a workdir, a checkpoint "
                                                       "step folder or an exported encoder folder")
    p.add_argument("--out", required=True)
    p.add_argument("--half", choices=("tune", "report"), default="report")
    p.add_argument("--llm", default=None, help="default: the committed world LLM (assets/llm)")
    p.add_argument("--shots", default="0,1,4")
    p.add_argument("--pseudo-shots", type=int, default=2)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="the first N scenes of the half only")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


def half_indices(half: str, limit: int | None = None) -> list[int]:
    """The held-out scenes of one half (evaluation order)."""
    from projects.miniworld import scenes

    order = [int(i) for i in scenes.evaluation_indices()]
    mid = len(order) // 2
    chosen = order[:mid] if half == "tune" else order[mid:]
    return chosen[:limit]


def caption_texts() -> dict[str, dict[str, str]]:
    """Every scene's caption of each kind: {source: {scene index: text}}."""
    from projects.miniworld import captions, scenes

    fns = dict(zip(CAPTION_SOURCES, (captions.short_caption, captions.short_caption_with_background,
                                     captions.full_caption)))
    every = scenes.all_scenes()
    return {name: {str(i): fn(s) for i, s in enumerate(every)} for name, fn in fns.items()}


def de_diffusion_texts(checkpoint: str) -> dict[str, str]:
    """Every scene's De-Diffusion text from the encoder."""
    from dediffusion_jax.inference import TextEncoder
    from projects.miniworld import scenes

    encoder = TextEncoder.from_checkpoint(checkpoint, batch_size=256)
    texts = encoder.texts(scenes.images_of(range(scenes.NUM_SCENES)))
    return {str(i): t for i, t in enumerate(texts)}


def vqa_rows(eval_indices: list[int], seed: int) -> list[dict]:
    """One question per type per eval scene, then one random question per support train scene."""
    import numpy as np

    from projects.miniworld import fewshot_tasks, scenes

    rows = []
    for i in eval_indices:
        rng = np.random.default_rng([seed, i])
        for qtype in fewshot_tasks.QUESTION_TYPES:
            qa = fewshot_tasks.question(scenes.scene_from_index(i), qtype, rng)
            if qa is not None:
                rows.append({"question_id": f"{i}/{qtype}", "image_id": str(i), "question": qa[0],
                             "answer": qa[1], "question_type": qtype, "split": "eval"})
    rng = np.random.default_rng([seed, 10**6])
    train = scenes.split_indices("train")
    for i in sorted(int(j) for j in rng.choice(train, SUPPORT_SCENES, replace=False)):
        qtype, q, a = fewshot_tasks.random_question(scenes.scene_from_index(i), rng)
        rows.append({"question_id": f"{i}/{qtype}", "image_id": str(i), "question": q, "answer": a,
                     "question_type": qtype, "split": "train"})
    return rows


def kind_rows(eval_indices: list[int]) -> list[dict]:
    """Scene kinds of the eval scenes and of every train scene (the classes' support pool)."""
    from projects.miniworld import fewshot_tasks, scenes

    rows = [{"image_id": str(i), "label": fewshot_tasks.scene_kind(scenes.scene_from_index(i)), "split": "eval"}
            for i in eval_indices]
    for i in scenes.split_indices("train"):
        rows.append({"image_id": str(int(i)), "label": fewshot_tasks.scene_kind(scenes.scene_from_index(int(i))),
                     "split": "train"})
    return rows


def write_inputs(args: argparse.Namespace, dd_texts: dict[str, str] | None = None) -> dict[str, Path]:
    """The texts and questions files; De-Diffusion texts are encoded once and kept in OUT/texts."""
    from dediffusion_jax.fewshot import data

    out = Path(args.out)
    files = {}
    dd_file = out / "texts" / "de_diffusion.jsonl"
    if dd_texts is None and not dd_file.exists():
        dd_texts = de_diffusion_texts(args.checkpoint)
    if dd_texts is not None:
        data.write_jsonl(dd_file, [{"id": i, "text": t} for i, t in dd_texts.items()])
    files[DE_DIFFUSION] = dd_file
    for name, texts in caption_texts().items():
        slug = name.split(" (")[0].replace(" + ", "_").replace(" ", "_")
        files[name] = data.write_jsonl(out / "texts" / f"{slug}.jsonl", [{"id": i, "text": t} for i, t in texts.items()])
    indices = half_indices(args.half, args.limit)
    files["vqa"] = data.write_jsonl(out / "vqa_questions.jsonl", vqa_rows(indices, args.seed))
    files["kinds"] = data.write_jsonl(out / "kinds.jsonl", kind_rows(indices))
    return files


def core_argv(args: argparse.Namespace, files: dict[str, Path], task: str) -> list[str]:
    """The core command's arguments for one task (printed, so the run can be repeated by hand)."""
    from projects.miniworld import llm as world_llm

    argv = []
    for name in (DE_DIFFUSION, *CAPTION_SOURCES):
        argv += ["--texts", f"{name}={files[name]}"]
    argv += ["--blank", "--llm", str(args.llm or world_llm.DEFAULT_DIR), "--seed", str(args.seed)]
    if task == "vqa":
        argv += ["--questions", str(files["vqa"]), "--shots", args.shots, "--pseudo-shots", str(args.pseudo_shots)]
    else:
        argv += ["--task", "classify", "--questions", str(files["kinds"]), "--shots", "1", "--ways", str(args.ways)]
    return argv + ["--out", str(Path(args.out) / task)]


def naming_diagnosis(out: Path, ways: int, seed: int) -> dict:
    """Accuracy and in-episode share of every naming setting, from OUT/kinds.jsonl and the core
    command's predictions (the episodes are redrawn exactly as the core command draws them)."""
    from dediffusion_jax.fewshot import data, support

    rows = data.read_items(out / "kinds.jsonl")
    pool = [r for r in rows if r.split == "train"]
    evals = [r for r in rows if r.split != "train"]
    by_label: dict[str, list] = {}
    for it in pool:
        by_label.setdefault(it.label, []).append(it)
    names_of = [set(support.episode(it.label, by_label, ways, 1, seed, f"{it.image_id}/{j}/1").names)
                for j, it in enumerate(evals)]
    table: dict[str, dict[str, dict[str, float]]] = {}
    preds = [json.loads(line) for line in (out / "classify" / "predictions.jsonl").read_text().splitlines()]
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in preds:
        groups.setdefault((p["source"], p["setting"]), []).append(p)
    for (source, setting), ps in groups.items():
        inside = [p["prediction"].strip() in names for p, names in zip(ps, names_of)]
        by_kinds: dict[str, list[float]] = {}
        for p in ps:  # a scene kind is its object kinds joined by " + "
            by_kinds.setdefault(str(p["label"].count(" + ") + 1), []).append(p["score"])
        table.setdefault(source, {})[setting] = {
            "accuracy": round(100 * sum(p["score"] for p in ps) / len(ps), 1),
            "in_episode": round(100 * sum(inside) / len(ps), 1),
            "by_object_kinds": {k: {"accuracy": round(100 * sum(v) / len(v), 1), "queries": len(v)}
                                for k, v in sorted(by_kinds.items())}}
    (out / "classify" / "names.json").write_text(json.dumps(table, indent=2) + "\n")
    settings = sorted({s for v in table.values() for s in v})
    lines = ["| text source | " + " | ".join(f"{s}: acc / answer in episode" for s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    lines += [f"| {src} | " + " | ".join(f"{v[s]['accuracy']} / {v[s]['in_episode']}" for s in settings) + " |"
              for src, v in table.items()]
    kinds = sorted({k for v in table.values() for s in v.values() for k in s["by_object_kinds"]})
    lines += ["", "Accuracy by the number of object kinds in the query scene (queries):", "",
              "| text source | setting | " + " | ".join(f"{k} kind{'s' * (k != '1')}" for k in kinds) + " |",
              "|---|---|" + "---|" * len(kinds)]
    for src, v in table.items():
        for setting in settings:
            cells = [v[setting]["by_object_kinds"].get(k) for k in kinds]
            lines.append(f"| {src} | {setting} | " + " | ".join(
                f"{c['accuracy']} ({c['queries']})" if c else "" for c in cells) + " |")
    (out / "classify" / "names.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return table


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from dediffusion_jax.fewshot.__main__ import main as fewshot_main

    files = write_inputs(args)
    for task in ("vqa", "classify"):
        core = core_argv(args, files, task)
        print("python -m dediffusion_jax.fewshot " + " ".join(json.dumps(a) if " " in a else a for a in core),
              flush=True)
        rc = fewshot_main(core)
        if rc:
            return rc
    naming_diagnosis(Path(args.out), args.ways, args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    return errors.run_main(_main, argv)


if __name__ == "__main__":
    answer_help_early(build_parser)
    sys.exit(main())
