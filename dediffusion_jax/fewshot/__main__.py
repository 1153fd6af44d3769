"""Few-shot VQA / captioning / classification through a language model that reads images as text (App. B).

    python -m dediffusion_jax.fewshot --texts "De-Diffusion=texts.jsonl" --texts "captions=caps.jsonl" \
        --blank --questions questions.jsonl --llm http://127.0.0.1:8080/v1 --shots 0,4,32 --out results/

`--texts [NAME=]FILE`: one text source per flag, in `encode`'s texts.jsonl format ({"id", "text"});
the support images' texts come from the same file. `--blank` adds the blank query (no image context
anywhere: the model's prior). `--llm`: an OpenAI-compatible server's base URL (llama.cpp, vLLM,
Ollama, TGI) or a local transformers folder (safetensors). Writes OUT/results.json, OUT/results.md
(text source x shots, and per question type) and OUT/predictions.jsonl; answers are cached in
OUT/answers.jsonl (or --cache), so a rerun asks the model nothing it already answered.
`--task caption`: rows {image_id, captions: [...], split?}; each image's caption is scored by CIDEr-D
against its captions as the COCO toolkit does (document frequencies from the evaluated images).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dediffusion_jax import errors

BLANK = "blank (no image context)"
CAPTION_NOTES = ("CIDEr-D x100 (the COCO toolkit's CIDEr, as papers print it), over the evaluated images; "
                 "document frequencies from their reference captions.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dediffusion_jax.fewshot", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--texts", action="append", default=[], metavar="[NAME=]FILE",
                   help="a text source: JSONL {id, text} (repeatable; NAME defaults to the file's stem)")
    p.add_argument("--blank", action="store_true", help="add the blank-query source (no image context)")
    p.add_argument("--questions", required=True,
                   help="VQA: JSONL {image_id, question, answers|answer, question_type?, split?}; "
                        "caption: JSONL {image_id, captions, split?}; "
                        "classify: JSONL {image_id, label, split?}. 'train' rows are the support pool")
    p.add_argument("--support", default=None, help="the support pool from another file (all its rows)")
    p.add_argument("--task", choices=("vqa", "caption", "classify"), default="vqa")
    p.add_argument("--llm", required=True, help="http(s)://HOST:PORT/v1 or a transformers model folder")
    p.add_argument("--shots", default=None, help="comma list (vqa, caption default 0,4,32; classify default 1)")
    p.add_argument("--pseudo-shots", type=int, default=2,
                   help="zero-shot: support examples with the image context left blank (default 2)")
    p.add_argument("--ways", type=int, default=5, help="classify: classes per episode")
    p.add_argument("--induction", choices=("both", "yes", "no"), default="both",
                   help="classify: with task induction, without, or both columns")
    p.add_argument("--seed", type=int, default=0, help="support sampling seed")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N eval questions only")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="longest answer generated, in tokens (default 8; caption 32)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cache", default=None, help="answer cache (default OUT/answers.jsonl)")
    p.add_argument("--no-cache", action="store_true")
    g = p.add_argument_group("HTTP backend")
    g.add_argument("--llm-model", default=None, help="model name sent to the server (default: first of /models)")
    g.add_argument("--llm-api", choices=("completions", "chat"), default="completions")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    g.add_argument("--retries", type=int, default=3)
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    g = p.add_argument_group("local backend")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--batch-size", type=int, default=32)
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


def parse_shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as e:
        raise errors.UserError(f"--shots {text!r}: a comma list of integers, e.g. 0,4,32") from e
    if not shots or min(shots) < 0:
        raise errors.UserError(f"--shots {text!r}: a comma list of integers >= 0")
    return shots


def source_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """`NAME=FILE` or `FILE` -> (name, path); names must differ."""
    out = []
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path_obj = Path(path)
        out.append((name or path_obj.stem, path_obj))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise errors.UserError(f"--texts: two sources share a name ({names}); name them NAME=FILE")
    return out


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from dediffusion_jax.fewshot import data, report, run
    from dediffusion_jax.fewshot.backends import open_llm
    from dediffusion_jax.fewshot.cache import AnswerCache, CachedLLM

    if not args.texts and not args.blank:
        raise errors.UserError("give at least one --texts [NAME=]FILE (or --blank)")
    shots = parse_shots(args.shots or ("1" if args.task == "classify" else "0,4,32"))
    max_tokens = args.max_tokens if args.max_tokens is not None else (32 if args.task == "caption" else 8)
    sources = {name: data.read_texts(path) for name, path in source_specs(args.texts)}
    read = {"vqa": data.read_questions, "caption": data.read_captioned, "classify": data.read_items}[args.task]
    rows = read(args.questions)
    pool = read(args.support) if args.support else [r for r in rows if r.split == "train"]
    evals = [r for r in rows if r.split != "train"][:args.limit]
    if not evals:
        raise errors.UserError(f"{args.questions}: no eval rows (rows without \"split\": \"train\")")
    if args.blank:
        ids = {r.image_id for r in [*evals, *pool]}
        sources[BLANK] = {i: "" for i in ids}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = open_llm(args.llm, model=args.llm_model, api=args.llm_api, timeout=args.timeout,
                   retries=args.retries, concurrency=args.concurrency, device=args.device,
                   batch_size=args.batch_size)
    if not args.no_cache:
        llm = CachedLLM(llm, AnswerCache(args.cache or out / "answers.jsonl"))
    start = time.time()

    def progress(line: str) -> None:
        print(f"[{time.time() - start:6.1f} s] {line}", file=sys.stderr, flush=True)

    if args.task in ("vqa", "caption"):
        kind = run.VqaSettings if args.task == "vqa" else run.CaptionSettings
        settings = kind(shots=shots, pseudo_shots=args.pseudo_shots, seed=args.seed, max_tokens=max_tokens)
        if max(shots) > len(pool) or (0 in shots and args.pseudo_shots > len(pool)):
            what = "questions" if args.task == "vqa" else "images"
            raise errors.UserError(f"the support pool has {len(pool)} {what}; --shots {args.shots} "
                                   "needs more (mark rows \"split\": \"train\" or give --support)")
        evaluate = run.evaluate_vqa if args.task == "vqa" else run.evaluate_caption
        result = evaluate(llm, evals, pool, sources, settings, progress)
    else:
        induction = {"both": (True, False), "yes": (True,), "no": (False,)}[args.induction]
        settings = run.ClassifySettings(ways=args.ways, shots=shots, induction=induction, seed=args.seed,
                                        max_tokens=max_tokens)
        try:
            result = run.evaluate_classify(llm, evals, pool, sources, settings, progress)
        except ValueError as e:
            raise errors.UserError(str(e)) from e
    summary = {"task": args.task, "llm": llm.identity, "settings": vars(settings) | {"shots": list(shots)},
               "questions": len(evals), "support_pool": len(pool), "sources": result["sources"],
               "seconds": round(time.time() - start, 1)}
    if isinstance(llm, CachedLLM):
        summary["cache"] = {"hits": llm.hits, "misses": llm.misses}
    if args.task == "caption":
        summary["metric"] = "CIDEr-D (pycocoevalcap's CIDEr), per image and averaged; results.md shows it x100"
        title, notes, metric = f"Few-shot caption: {len(evals)} images, {llm.identity}", CAPTION_NOTES, "cider"
    else:
        title, notes, metric = f"Few-shot {args.task}: {len(evals)} questions, {llm.identity}", "", "accuracy"
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    data.write_jsonl(out / "predictions.jsonl", result["predictions"])
    (out / "results.md").write_text(report.markdown(result["sources"], title, notes, metric))
    print(report.accuracy_table(result["sources"], metric))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: 0 on success, one `error: ...` line and 2 (3: the server failed) otherwise."""
    return errors.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
