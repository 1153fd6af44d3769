"""The world LLM: a small causal language model of the miniature world, trained on TEXT ONLY.

    python -m projects.miniworld.llm --workdir workdirs/world_llm --out projects/miniworld/assets/llm \
        [--steps 1600] [--batch 32] [--seed 0] [--threads 1]

PaLM 2 plays the LLM in the paper: it learned language from text and never saw De-Diffusion text. The
world's stand-in learns the world from text the same way: App.-B-format prompts (`dediffusion_jax.
fewshot.prompts`: VQA k-shot and zero-shot with pseudo samples, open-ended N-way K-shot classification
with and without task induction) whose image contexts are world descriptions of TRAIN scenes drawn as
the decoder's caption mix (`captions.training_caption`: empty, full, shuffled, partial captions and
word soups with the tokenizer's distractor words), and whose answers are the scenes' truths
(`fewshot_tasks`). It never reads De-Diffusion text, nor a held-out scene.

The model is a transformers `LlamaForCausalLM` (4 layers, width 128, RoPE) with a byte-level BPE
tokenizer learned from the same text; both are written as a transformers folder (float16
safetensors, tokenizer.json) that `AutoModelForCausalLM` and the few-shot CLI's `--llm DIR` load.
The loss is the next-token loss on the answers plus `--lm-weight` times the next-token loss on the rest
of the text. The first `--simple-steps` steps are one-line questions on full captions (a curriculum:
the look-up is learned there). At lr 3e-3 two runs (answers only; answers + text) stayed at the
prior's loss for 400+ steps with answers that did not depend on the context; lr 1e-3 learned. The batch of step s is a pure function of
(seed, s), and the workdir keeps a safetensors checkpoint (weights, Adam moments, step), so a run
stopped at any point resumes to the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dediffusion_jax import errors
from dediffusion_jax.cli_flags import answer_help_early

DEFAULT_DIR = Path(__file__).with_name("assets") / "llm"
SPECIAL = "<|endoftext|>"
P_SOUP = 0.25  # the v4 decoder's word-soup share (docs/miniworld.md)
MAX_LEN = 320
QUERIES = 3  # answered queries per classification text
MICRO = 2  # micro-batches per step, grouped by length (less padding)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m projects.miniworld.llm", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="checkpoint folder of the run (resumed when present)")
    p.add_argument("--out", default=str(DEFAULT_DIR), help="where the trained model folder is written")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak learning rate (3e-3 collapsed attention: the answers stopped depending on the context)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--simple-steps", type=int, default=500,
                   help="curriculum: the first N steps are one-line VQA on full / shuffled captions")
    p.add_argument("--lm-weight", type=float, default=0.5,
                   help="weight of the next-token loss on the non-answer text (the answers weigh 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine 2 threads ran 10x slower)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--stop-after-steps", type=int, default=0, help="save and stop after N steps (resume later)")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


# ------------------------------------------------------------------------------------------ the text


def _context(index: int, rng: np.random.Generator) -> str:
    from projects.miniworld import captions, scenes
    from projects.miniworld.tokenizer import DISTRACTORS

    return captions.training_caption(scenes.scene_from_index(index), rng, P_SOUP, DISTRACTORS)


def _train_scene(rng: np.random.Generator) -> int:
    from projects.miniworld import scenes

    return int(scenes.sample_indices(rng, 1, "train")[0])


def vqa_example(rng: np.random.Generator) -> tuple[str, list[tuple[int, int]]]:
    """A k-shot (or pseudo-sample zero-shot) VQA prompt answered, and the character spans of every
    answer (` red$`), the tokens the loss reads."""
    from dediffusion_jax.fewshot import prompts
    from projects.miniworld import fewshot_tasks, scenes

    k = int(rng.choice([0, 1, 2, 4], p=[0.4, 0.2, 0.2, 0.2]))
    pseudo = k == 0 and rng.random() < 0.75
    if pseudo:
        k = int(rng.choice([1, 2]))
    lines = []
    for j in range(k + 1):
        index = _train_scene(rng)
        _, q, a = fewshot_tasks.random_question(scenes.scene_from_index(index), rng)
        context = "" if pseudo and j < k else _context(index, rng)
        lines.append((prompts.vqa_line(context, q), f" {a}{prompts.ANSWER_END}"))
    return _join(lines, range(len(lines)))


def classify_example(rng: np.random.Generator) -> tuple[str, list[tuple[int, int]]]:
    """An open-ended N-way K-shot naming of scene kinds (task induction once, at the start, half the
    time), then QUERIES answered queries; the loss reads the queries' answers."""
    from dediffusion_jax.fewshot import prompts, support
    from projects.miniworld import fewshot_tasks, scenes

    ways = int(rng.choice([2, 3, 5]))
    shots = 1 if rng.random() < 0.8 else 2
    kinds = fewshot_tasks.kinds_of_split("train")
    query = _train_scene(rng)
    ep = support.episode(fewshot_tasks.scene_kind(scenes.scene_from_index(query)), kinds, ways, shots,
                         seed=int(rng.integers(2**31)), key="train")
    names = ep.names if rng.random() < 0.5 else None
    name_of = {fewshot_tasks.scene_kind(scenes.scene_from_index(int(i))): n for i, n in ep.support}
    queries = [(query, ep.answer)]
    for _ in range(QUERIES - 1):  # more answered queries of the episode's classes: more signal per text
        kind = sorted(name_of)[int(rng.integers(len(name_of)))]
        pool = kinds[kind]
        queries.append((pool[int(rng.integers(len(pool)))], name_of[kind]))
    items = [(int(i), n) for i, n in ep.support] + queries
    lines = [(prompts.classify_line(_context(i, rng), None, names if j == 0 else None),
              f" {n}{prompts.CLASS_END}") for j, (i, n) in enumerate(items)]
    return _join(lines, range(len(ep.support), len(lines)))


def _join(lines: list[tuple[str, str]], scored: Any) -> tuple[str, list[tuple[int, int]]]:
    from dediffusion_jax.fewshot import prompts

    text, spans = "", []
    scored = set(scored)
    for j, (head, answer) in enumerate(lines):
        if j:
            text += prompts.SHOT_SEPARATOR
        text += head
        if j in scored:
            spans.append((len(text), len(text) + len(answer)))
        text += answer
    return text, spans


def simple_example(rng: np.random.Generator) -> tuple[str, list[tuple[int, int]]]:
    """The curriculum's first texts: one VQA line whose context is the full caption (70%) or its
    segments shuffled (30%): every answer is in the context, so the look-up is all there is to learn."""
    from dediffusion_jax.fewshot import prompts
    from projects.miniworld import captions, fewshot_tasks, scenes

    scene = scenes.scene_from_index(_train_scene(rng))
    segs = captions.object_segments(scene) + [captions.background_segment(scene)]
    if rng.random() < 0.3:
        segs = [segs[int(i)] for i in rng.permutation(len(segs))]
    _, q, a = fewshot_tasks.random_question(scene, rng)
    return _join([(prompts.vqa_line(captions.SEGMENT_SEP.join(segs), q), f" {a}{prompts.ANSWER_END}")], [0])


def example(rng: np.random.Generator, simple: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """One training text: 75% VQA, 25% classification (`simple`: the curriculum's first kind)."""
    if simple:
        return simple_example(rng)
    return vqa_example(rng) if rng.random() < 0.75 else classify_example(rng)


# ------------------------------------------------------------------------------- tokenizer and model


def build_tokenizer(seed: int, n_texts: int = 3000, vocab_size: int = 640) -> Any:
    """A byte-level BPE (GPT-2's scheme) learned from the world's training text: any string encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from projects.miniworld.captions import WORLD_WORDS
    from projects.miniworld.tokenizer import DISTRACTORS

    rng = np.random.default_rng([seed, 2**31])
    texts = [example(rng)[0] for _ in range(n_texts)] + [" ".join(WORLD_WORDS + DISTRACTORS)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                                   pad_token=SPECIAL, unk_token=SPECIAL, model_max_length=2048)


def model_config(vocab_size: int, special_id: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True,
                       bos_token_id=special_id, eos_token_id=special_id, pad_token_id=special_id)


def batch_tensors(tokenizer: Any, texts: list[str], spans: list[list[tuple[int, int]]]) -> dict[str, Any]:
    """input_ids / attention_mask / labels / is_answer (1 on answer tokens), right-padded, cut at
    MAX_LEN; labels are -100 on padding."""
    import torch

    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False, truncation=True,
                    max_length=MAX_LEN, padding=True, return_tensors="np")
    is_answer = np.zeros(enc["input_ids"].shape, bool)
    for b, (offsets, sp) in enumerate(zip(enc["offset_mapping"], spans)):
        for t, (s, e) in enumerate(offsets):
            is_answer[b, t] = e > s and any(s < hi and e > lo for lo, hi in sp)
    labels = np.where(enc["attention_mask"] == 0, -100, enc["input_ids"]).astype(np.int64)
    return {"input_ids": torch.from_numpy(enc["input_ids"].astype(np.int64)),
            "attention_mask": torch.from_numpy(enc["attention_mask"].astype(np.int64)),
            "labels": torch.from_numpy(labels), "is_answer": torch.from_numpy(is_answer)}


def batch_of_step(tokenizer: Any, seed: int, step: int, batch: int, simple_steps: int = 0) -> list[dict[str, Any]]:
    """The batch of a step, a pure function of (seed, step), as MICRO micro-batches of similar
    lengths (each padded to its own longest text); the first `simple_steps` steps are the curriculum's."""
    rng = np.random.default_rng([seed, step])
    examples = sorted((example(rng, step < simple_steps) for _ in range(batch)), key=lambda e: len(e[0]))
    size = -(-batch // MICRO)
    chunks = [examples[i:i + size] for i in range(0, batch, size)]
    return [batch_tensors(tokenizer, [t for t, _ in c], [sp for _, sp in c]) for c in chunks]


# ------------------------------------------------------------------------------------------ training


def _lr(step: int, total: int, peak: float, warmup: int = 60) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, t))))


def _save_state(path: Path, model: Any, opt: Any, step: int, args_item: dict) -> None:
    """Weights, Adam moments and step as one safetensors file (no pickle), written atomically."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}
    for i, p in enumerate(model.parameters()):
        st = opt.state.get(p)
        if st:
            tensors[f"adam.{i}.exp_avg"] = st["exp_avg"].contiguous()
            tensors[f"adam.{i}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            tensors[f"adam.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "args": json.dumps(args_item, sort_keys=True)})
    tmp.replace(path)


def _load_state(path: Path, model: Any, opt: Any, args_item: dict) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        if json.loads(meta["args"]) != args_item:
            raise errors.UserError(f"{path} was written by a run with other arguments "
                                   f"({meta['args']}); use another --workdir")
        state = {k[len("model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
        model.load_state_dict(state, strict=False)
        for i, p in enumerate(model.parameters()):
            if f"adam.{i}.exp_avg" in f.keys():
                opt.state[p] = {"exp_avg": f.get_tensor(f"adam.{i}.exp_avg"),
                                "exp_avg_sq": f.get_tensor(f"adam.{i}.exp_avg_sq"),
                                "step": f.get_tensor(f"adam.{i}.step").reshape(())}
        return int(meta["step"])


def train(args: argparse.Namespace) -> Path:
    """Trains (or resumes) in `args.workdir` and exports the model folder to `args.out`."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tok_dir = workdir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        build_tokenizer(args.seed).save_pretrained(str(tok_dir))
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    special = tokenizer.convert_tokens_to_ids(SPECIAL)
    model = LlamaForCausalLM(model_config(len(tokenizer), special))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    item = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "lm_weight": args.lm_weight,
            "simple_steps": args.simple_steps}
    ckpt = workdir / "state.safetensors"
    step = _load_state(ckpt, model, opt, item) if ckpt.exists() else 0
    log = open(workdir / "metrics.jsonl", "a")
    wall = json.loads((workdir / "wall.json").read_text())["seconds"] if (workdir / "wall.json").exists() else 0.0
    start, last = time.time(), time.time()
    model.train()
    stop_at = min(args.steps, step + args.stop_after_steps) if args.stop_after_steps else args.steps
    while step < stop_at:
        micro = batch_of_step(tokenizer, args.seed, step, args.batch, args.simple_steps)
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.steps, args.lr)
        opt.zero_grad(set_to_none=True)
        n_answer = sum(int(m["is_answer"].sum()) for m in micro)
        n_other = sum(int((m["labels"] != -100).sum()) for m in micro) - n_answer
        loss_sum, hits = 0.0, 0
        for m in micro:  # means over the whole batch's answer / other tokens, whatever the grouping
            labels, is_answer = m.pop("labels")[:, 1:], m.pop("is_answer")[:, 1:]
            logits = model(**m).logits[:, :-1].float()
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=-100, reduction="none").reshape(labels.shape)
            answer_ce = (ce * is_answer).sum()
            ((answer_ce / n_answer) + args.lm_weight * (ce * ~is_answer).sum() / max(1, n_other)).backward()
            loss_sum += float(answer_ce.detach())
            hits += int(((logits.argmax(-1) == labels) & is_answer).sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0 or step == stop_at:
            rec = {"step": step, "loss": round(loss_sum / n_answer, 5), "answer_token_acc": round(hits / n_answer, 4),
                   "seconds": round(wall + time.time() - start, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
        if step % args.save_every == 0 or step == stop_at:
            _save_state(ckpt, model, opt, step, item)
            wall_now = wall + time.time() - start
            (workdir / "wall.json").write_text(json.dumps({"seconds": wall_now}))
    if step < args.steps:
        print(f"stopped at step {step} of {args.steps}; rerun the command to resume", flush=True)
        return workdir
    total = wall + time.time() - start
    return export(model, tokenizer, Path(args.out), {
        "command": "python -m projects.miniworld.llm " + " ".join(sys.argv[1:]),
        **item, "wall_seconds": round(total, 1), "threads": args.threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final": json.loads(open(workdir / "metrics.jsonl").read().splitlines()[-1]),
        "torch": torch.__version__})


def export(model: Any, tokenizer: Any, out: Path, record: dict) -> Path:
    """The model folder: config.json, float16 model.safetensors, tokenizer files, TRAINING.json."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """The command (one `error: ...` line for a user error)."""
    return errors.run_main(_cli, argv)


def _cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch", "threads", "save_every"):
        if getattr(args, name) < 1:
            raise errors.UserError(f"--{name.replace('_', '-')} must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(args)
    return 0


if __name__ == "__main__":
    answer_help_early(build_parser)
    sys.exit(main())
