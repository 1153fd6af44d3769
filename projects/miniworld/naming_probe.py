"""Does a world LLM match a query to its support? 5-way 1-shot naming of TRAIN scene kinds, by context.

    python -m projects.miniworld.naming_probe --llm projects/miniworld/assets/llm [--episodes 400] [--seed 123]

The held-out evaluation (`fewshot_eval`) has about 30 one-kind queries per half, too few to tell a
model that matches one-kind scenes only from one at chance. This probe draws episodes as the world
LLM's training does (`llm._naming_text`: a train query, 5 kinds, 1 shot, names drawn per episode)
with two kinds of context, the kind's object words alone (`blue square , red circle`: recipe 4's first
phase) and full captions, and scores the first token of the answer (greedy, all of the vocabulary),
apart for queries whose scene has one object kind and two. Chance is 20%.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from dediffusion_jax import errors
from dediffusion_jax.cli_flags import answer_help_early

CONTEXTS = ("kind", "full")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m projects.miniworld.naming_probe", description=__doc__.splitlines()[0])
    p.add_argument("--llm", required=True, help="a world LLM folder (transformers, safetensors)")
    p.add_argument("--episodes", type=int, default=400, help="per context kind")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


def episode(rng: np.random.Generator, context: str) -> tuple[str, list[tuple[int, int]], int]:
    """(text, answer span, object kinds in the query scene) of one 5-way 1-shot episode."""
    from projects.miniworld import captions, fewshot_tasks, llm, scenes

    queried: list[int] = []

    def describe(i: int) -> str:
        queried.append(i)  # the query is described last
        if context == "kind":
            return llm._kind_phase_context(i, rng, "kind")
        return captions.full_caption(scenes.scene_from_index(i))

    text, spans = llm._naming_text(rng, 5, 1, 1, describe)
    kinds = fewshot_tasks.scene_kind(scenes.scene_from_index(queried[-1])).count(" + ") + 1
    return text, spans, kinds


def probe(model: Any, tokenizer: Any, episodes: int, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """{context: {object kinds: {"accuracy", "queries"}}}: first answer token right, greedy."""
    import torch

    from projects.miniworld import llm

    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for context in CONTEXTS:
        hits: dict[int, list[int]] = {}
        for _ in range(episodes):
            text, spans, kinds = episode(rng, context)
            batch = llm.batch_tensors(tokenizer, [text], [spans])
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            first = int(np.flatnonzero(batch["is_answer"][0].numpy())[0])
            hits.setdefault(kinds, []).append(int(logits[0, first - 1].argmax() == batch["input_ids"][0, first]))
        out[context] = {str(k): {"accuracy": round(100 * float(np.mean(v)), 1), "queries": len(v)}
                        for k, v in sorted(hits.items())}
    return out


def _main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.episodes < 1:
        raise errors.UserError("--episodes must be >= 1")
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(1)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.llm, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.llm, dtype=torch.float32, use_safetensors=True,
                                                     local_files_only=True).eval()
    except OSError as e:
        raise errors.UserError(f"--llm {args.llm}: not a model folder with safetensors weights ({e})") from e
    result = probe(model, tokenizer, args.episodes, args.seed)
    print(json.dumps({"llm": args.llm, "episodes": args.episodes, "seed": args.seed, "accuracy": result}), flush=True)


def main(argv: list[str] | None = None) -> int:
    """The command; 0 on success, 2 with one `error: ...` line for a user error."""
    return errors.run_main(_main, argv)


if __name__ == "__main__":
    answer_help_early(build_parser)
    sys.exit(main())
