"""Can the world LLM's architecture learn to name by matching, and what makes it learn? A short trial.

    python -m projects.miniworld.recall_trial --key-words 4 [--warmup random] [--warmup-steps 2500]
        [--init projects/miniworld/assets/llm_recipe1] [--ways 2] [--queries 10] [--steps 600] [--seed 0]

Naming in the App.-B format (`Context: <text> Classification: <name>.`) needs a query line matched to
the support line with the same text, several tokens before the name. This trial strips the task to that:
`--ways` lines whose contexts are random keys of `--key-words` world words (1: `red`; 2: `red circle`;
4: `red circle , blue square`), made-up names drawn per text, then `--queries` answered repeats; answer
loss only, as the world LLM's recipes. `--warmup` first trains `--warmup-steps` steps on copying texts:
`fixed`, a random 24-word sequence said twice (the copy is always 24 words back), or `random`, recipe 5's
`llm.copying_example` (a segment recurs at a random distance). It prints the first-token accuracy of the
answered names every 50 steps (chance: 1 / ways) and ends with one JSON line. docs/fewshot.md,
"Recipe 5", has what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from dediffusion_jax import errors
from dediffusion_jax.cli_flags import answer_help_early

WARMUPS = ("none", "fixed", "random")
FIXED_WORDS = 24  # the `fixed` warm-up's sequence, said twice


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m projects.miniworld.recall_trial", description=__doc__.splitlines()[0])
    p.add_argument("--key-words", type=int, choices=(1, 2, 4), default=4)
    p.add_argument("--ways", type=int, default=2)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--steps", type=int, default=600, help="naming steps after the warm-up")
    p.add_argument("--warmup", choices=WARMUPS, default="none")
    p.add_argument("--warmup-steps", type=int, default=2500)
    p.add_argument("--init", default=None, help="a world LLM folder to start from (default: random weights)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


def recall_text(rng: np.random.Generator, key_words: int, ways: int, queries: int) -> tuple[str, list[tuple[int, int]]]:
    """`ways` distinct keys with their names, then `queries` answered repeats; the answers' spans."""
    from dediffusion_jax.fewshot import prompts
    from dediffusion_jax.fewshot.support import MADE_UP_NAMES
    from projects.miniworld.scenes import COLOURS, SHAPES

    def key() -> str:
        objects = [f"{COLOURS[int(rng.integers(len(COLOURS)))]} {SHAPES[int(rng.integers(len(SHAPES)))]}"
                   for _ in range(2)]
        return objects[0].split()[0] if key_words == 1 else objects[0] if key_words == 2 else " , ".join(objects)

    keys: list[str] = []
    while len(keys) < ways:
        k = key()
        if k not in keys:
            keys.append(k)
    names = [MADE_UP_NAMES[int(i)] for i in rng.permutation(len(MADE_UP_NAMES))[:ways]]
    order = list(range(ways)) + [int(rng.integers(ways)) for _ in range(queries)]
    text, spans = "", []
    for j, i in enumerate(order):
        text += (prompts.SHOT_SEPARATOR if j else "") + prompts.classify_line(keys[i])
        answer = f" {names[i]}{prompts.CLASS_END}"
        if j >= ways:
            spans.append((len(text), len(text) + len(answer)))
        text += answer
    return text, spans


def fixed_copy_text(rng: np.random.Generator) -> tuple[str, list[tuple[int, int]]]:
    """A random sequence of world words said twice: the copy is always FIXED_WORDS words back."""
    from dediffusion_jax.fewshot.support import MADE_UP_NAMES
    from projects.miniworld.captions import WORLD_WORDS

    pool = (*WORLD_WORDS, *MADE_UP_NAMES)
    words = [pool[int(i)] for i in rng.integers(len(pool), size=FIXED_WORDS)]
    first = " ".join(words)
    return f"{first} {first}", [(len(first) + 1 + len(words[0]), 2 * len(first) + 1)]


def _step(model: Any, opt: Any, batch: dict[str, Any]) -> float:
    """One answer-loss step; the first-token accuracy of the answers."""
    import torch

    labels, is_answer = batch["labels"][:, 1:], batch["is_answer"][:, 1:]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="none").reshape(labels.shape)
    opt.zero_grad(set_to_none=True)
    ((ce * is_answer).sum() / is_answer.sum()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    first = is_answer & ~torch.roll(is_answer, 1, 1)
    return float(((logits.argmax(-1) == labels) & first).sum() / first.sum())


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from projects.miniworld import llm

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    folder = args.init or str(llm.DEFAULT_DIR)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    if args.init:
        model = LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32, use_safetensors=True,
                                                 local_files_only=True)
    else:
        model = LlamaForCausalLM(llm.model_config(len(tokenizer), tokenizer.convert_tokens_to_ids(llm.SPECIAL)))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = args.warmup_steps if args.warmup != "none" else 0
    total, start, curve = warmup + args.steps, time.time(), []
    for step in range(total):
        rng = np.random.default_rng([args.seed, step])
        if step < warmup:
            make = fixed_copy_text if args.warmup == "fixed" else llm.copying_example
            texts = [make(rng) for _ in range(args.batch)]
        else:
            texts = [recall_text(rng, args.key_words, args.ways, args.queries) for _ in range(args.batch)]
        for g in opt.param_groups:
            g["lr"] = llm._lr(step, total, args.lr)
        acc = _step(model, opt, llm.batch_tensors(tokenizer, [t for t, _ in texts], [s for _, s in texts]))
        if (step + 1) % 50 == 0 or step + 1 == total:
            phase = "warmup" if step < warmup else "naming"
            rec = {"step": step + 1, "phase": phase, "first_token_acc": round(acc, 3),
                   "seconds": round(time.time() - start, 1)}
            print(json.dumps(rec), flush=True)
            if phase == "naming":
                curve.append(acc)
    return {"key_words": args.key_words, "ways": args.ways, "warmup": args.warmup, "warmup_steps": warmup,
            "init": args.init, "seed": args.seed, "chance": round(1 / args.ways, 3),
            "naming_acc_last_3": round(float(np.mean(curve[-3:])), 3), "seconds": round(time.time() - start, 1)}


def _main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    for name in ("ways", "steps", "batch"):
        if getattr(args, name) < 1:
            raise errors.UserError(f"--{name} must be >= 1")
    if args.warmup_steps < 0 or args.queries < 1:
        raise errors.UserError("--warmup-steps must be >= 0 and --queries >= 1")
    print(json.dumps(run(args)), flush=True)


def main(argv: list[str] | None = None) -> int:
    """The command; 0 on success, 2 with one `error: ...` line for a user error."""
    return errors.run_main(_main, argv)


if __name__ == "__main__":
    answer_help_early(build_parser)
    sys.exit(main())
