"""The world LLM: a small causal language model of the miniature world, trained on TEXT ONLY.

    python -m projects.miniworld.llm --workdir workdirs/world_llm --out projects/miniworld/assets/llm_recipe1 \
        [--recipe 1] [--steps 1600] [--batch 32] [--seed 0] [--threads 1]
    python -m projects.miniworld.llm --recipe 5 --init projects/miniworld/assets/llm_recipe1 \
        --workdir workdirs/world_llm_r5 --out projects/miniworld/assets/llm      # the committed model

PaLM 2 plays the LLM in the paper: it learned language from text and never saw De-Diffusion text. The
world's stand-in learns the world from text the same way: App.-B-format prompts (`dediffusion_jax.
fewshot.prompts`: VQA k-shot and zero-shot with pseudo samples, open-ended N-way K-shot classification
with and without task induction, made-up names drawn per episode) whose image contexts are world
descriptions of TRAIN scenes (recipe 1: the decoder's caption mix `captions.training_caption`; recipe 2:
CONTEXT_MIX; both: empty, full, shuffled and partial captions and word soups with the tokenizer's
distractor words), and whose answers
are the scenes' truths (`fewshot_tasks`). It never reads De-Diffusion text, nor a held-out scene.

The model is a transformers `LlamaForCausalLM` (4 layers, width 128, RoPE) with a byte-level BPE
tokenizer learned from the same text; both are written as a transformers folder (float16
safetensors, tokenizer.json) that `AutoModelForCausalLM` and the few-shot CLI's `--llm DIR` load.
The loss is the next-token loss on the answers plus `--lm-weight` times the next-token loss on the rest
of the text. Recipe 1 (the default; assets/llm_recipe1, the committed model until recipe 5, and its
init): the decoder's caption mix as contexts, 75% VQA / 25% naming, the first `--simple-steps` steps
one-line VQA on full captions. Recipe 2 (docs/fewshot.md, "Trying to fix naming": shape / presence
learned, naming still at chance, background / colour lost; not adopted): a curriculum of
`--lookup-steps` one-line VQA steps on full / shuffled captions, question types weighted toward the
look-ups that need an induction head (shape, presence), then up to `--simple-steps` half such lines,
half 2/3-way naming episodes on such captions; then the mix: `--naming-share` N-way K-shot naming
episodes (2/3/5-way, 4 answered queries), the rest k-shot VQA. Recipe 3 (docs/fewshot.md, "Recipe 3":
the look-ups learned, copying never formed; not adopted): `--lookup-steps` one-line VQA steps with
uniformly drawn question types, then naming episodes whose queries repeat a support's description word
for word, then other scenes of a support's kind, then recipe 2's mix. Recipe 4 (docs/fewshot.md, "Recipe
4": it learned to match one-kind scenes, not two-kind ones; naming still at chance on held-out scenes;
not adopted): from a trained model (`--init`), `--naming-share` naming episodes whose contexts widen
from the kind's object words (`--lookup-steps`) through KIND_PHASE_MIX['objects'] (to `--simple-steps`)
to ['all'], the rest recipe 1's VQA texts, answer loss only. Recipe 5 (the committed model, assets/llm;
docs/fewshot.md, "Recipe 5"): recipe 4 after `--induct-steps` steps of copying texts (`copying_example`:
a segment of words recurs at a random distance), the content-based copying that naming needs and that no
App.-B text mix formed in this model; they stay INDUCT_SHARE of every later step. At lr 3e-3 two
recipe-1 runs stayed at the prior's loss for 400+ steps with answers that did not depend on the context;
lr 1e-3 learned. The batch of step s is a pure function of (seed, s), and the workdir keeps a
safetensors checkpoint (weights, Adam moments, step), so a run stopped at any point resumes to the same
weights.
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

DEFAULT_DIR = Path(__file__).with_name("assets") / "llm"  # recipe 5: the committed world LLM
RECIPE1_DIR = Path(__file__).with_name("assets") / "llm_recipe1"  # recipe 1: recipe 5's --init
SPECIAL = "<|endoftext|>"
P_SOUP = 0.25  # the v4 decoder's word-soup share (docs/miniworld.md)
# The LLM's context mix (v2): every line shows its scene more often than the decoder's mix does (12%
# empty, 20% partial there: in 5-way naming episodes most queries could not be matched to their
# support, measured). Empty, full, shuffled, soup (the v4 share), partial.
CONTEXT_MIX = (0.05, 0.45, 0.15, P_SOUP, 0.10)
MAX_LEN = 320
QUERIES = 4  # answered queries per classification text
# The look-up phase's question types (colour, shape, position, count, background, presence): the
# look-ups that need an induction head (shape: the word after the colour; presence) drawn more often.
LOOKUP_WEIGHTS = (0.2, 0.25, 0.15, 0.05, 0.05, 0.3)
QUERIES_V1 = 3
RECIPES = (1, 2, 3, 4, 5)  # 1: assets/llm_recipe1's (the decoder's caption mix, 25% naming, 3 queries, a
# VQA-only curriculum, 1,600 steps); 2: CONTEXT_MIX, a look-up phase, a naming curriculum, 50% naming;
# 3: recipe 2 with a longer look-up phase of uniformly drawn question types, then naming by copying
# (each query is a support's own scene and description) before naming other scenes of a support's kind;
# 4: naming from a trained model (`--init`): contexts that grow from the scene kind's object words alone
# to the full context mix, beside a replay of recipe 1's VQA texts; 5: recipe 4 after `--induct-steps` of
# repeated-segment texts (content-based copying: docs/fewshot.md, "Recipe 5"), which stay INDUCT_SHARE
# of every later step
DEFAULTS = {1: {"steps": 1600, "simple_steps": 500, "lookup_steps": 0, "naming_share": 0.25, "lm_weight": 0.5},
            2: {"steps": 3000, "simple_steps": 1200, "lookup_steps": 700, "naming_share": 0.5, "lm_weight": 0.5},
            3: {"steps": 3600, "simple_steps": 2800, "lookup_steps": 1200, "naming_share": 0.5, "lm_weight": 0.5},
            4: {"steps": 4000, "simple_steps": 2000, "lookup_steps": 1000, "naming_share": 0.75, "lm_weight": 0.0},
            5: {"steps": 6500, "simple_steps": 4500, "lookup_steps": 3500, "naming_share": 0.75, "lm_weight": 0.0,
                "induct_steps": 2500}}
# Recipe 5's copying texts: INDUCT_WORDS words, a segment of INDUCT_SEGMENT words repeated at a random
# distance; their share of every step after the warm-up
INDUCT_WORDS, INDUCT_SEGMENT, INDUCT_SHARE = 48, (4, 12), 0.1
# Recipe 4's naming contexts per phase: (object words of the kind, sorted; object words shuffled;
# full caption, segments shuffled 30%; CONTEXT_MIX)
KIND_PHASE_MIX = {"kind": (1.0, 0.0, 0.0, 0.0), "objects": (1 / 3, 1 / 3, 1 / 3, 0.0), "all": (0.2, 0.0, 0.4, 0.4)}
MICRO = 2  # micro-batches per step, grouped by length (less padding)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m projects.miniworld.llm", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="checkpoint folder of the run (resumed when present)")
    p.add_argument("--out", default=str(DEFAULT_DIR), help="where the trained model folder is written")
    p.add_argument("--recipe", type=int, choices=RECIPES, default=1,
                   help="1: the committed model's training (default); 2: the naming / look-up curriculum "
                        "(docs/fewshot.md: measured worse on the tune half); 3: a uniform look-up phase, "
                        "then naming by copying, then naming (docs/fewshot.md); 4: naming learned from a "
                        "trained model (--init) on contexts that grow from the kind's object words to the "
                        "full mix, with recipe 1's VQA replayed (docs/fewshot.md, 'Recipe 4'); 5: recipe 4 "
                        "after a warm-up on copying texts (docs/fewshot.md, 'Recipe 5')")
    p.add_argument("--steps", type=int, default=None,
                   help="default: 1600 (recipe 1), 3000 (recipe 2), 3600 (recipe 3), 4000 (recipe 4), "
                        "6500 (recipe 5)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak learning rate (3e-3 collapsed attention: the answers stopped depending on the context)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lookup-steps", type=int, default=None,
                   help="recipe 2, curriculum phase 1: the first N steps are one-line VQA on full / shuffled "
                        "captions (default 700); recipe 4: the naming contexts are the kind's object words "
                        "alone for the first N steps (default 1000; recipe 5: 3500)")
    p.add_argument("--simple-steps", type=int, default=None,
                   help="curriculum: the first N steps are one-line VQA on full / shuffled captions (recipe 1, "
                        "default 500); recipe 2 (default 1200): half such lines, half 2/3-way naming; "
                        "recipe 4 (default 2000; recipe 5: 4500): until step N a third each of object words sorted, "
                        "shuffled, and full captions; then KIND_PHASE_MIX['all']")
    p.add_argument("--naming-share", type=float, default=None,
                   help="recipe 2: share of N-way K-shot naming texts after the curriculum (default 0.5; "
                        "recipe 1: 0.25; recipes 4 and 5: 0.75 of every step, the rest recipe 1's VQA texts)")
    p.add_argument("--lm-weight", type=float, default=None,
                   help="weight of the next-token loss on the non-answer text (the answers weigh 1; "
                        "default 0.5, recipes 4 and 5: 0)")
    p.add_argument("--induct-steps", type=int, default=None,
                   help="recipe 5: the first N steps are copying texts only (default 2500); its lookup / "
                        "simple steps count from step 0, as every recipe's")
    p.add_argument("--init", default=None,
                   help="recipes 4 and 5: the model folder to start from, its tokenizer included (the "
                        "recipe-1 model, projects/miniworld/assets/llm_recipe1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine 2 threads ran 10x slower)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--stop-after-steps", type=int, default=0, help="save and stop after N steps (resume later)")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


# ------------------------------------------------------------------------------------------ the text


def _context(index: int, rng: np.random.Generator, clean: bool = False, recipe: int = 2) -> str:
    """A description of a train scene from CONTEXT_MIX (`clean`: its full caption, segments shuffled
    30% of the time, as in the curriculum); recipe 1: the decoder's caption mix."""
    from projects.miniworld import captions, scenes
    from projects.miniworld.tokenizer import DISTRACTORS

    scene = scenes.scene_from_index(index)
    if recipe == 1:
        return captions.training_caption(scene, rng, P_SOUP, DISTRACTORS)
    segs = captions.object_segments(scene) + [captions.background_segment(scene)]
    shuffled = captions.SEGMENT_SEP.join(segs[int(i)] for i in rng.permutation(len(segs)))
    if clean:
        return shuffled if rng.random() < 0.3 else captions.full_caption(scene)
    kind = int(rng.choice(len(CONTEXT_MIX), p=CONTEXT_MIX))
    if kind == 0:
        return ""
    if kind == 1:
        return captions.full_caption(scene)
    if kind == 2:
        return shuffled
    if kind == 3:
        return captions.word_soup_caption(scene, rng, DISTRACTORS)
    while True:  # partial: some objects (positions sometimes dropped) and maybe the background, not empty
        text = captions.training_caption(scene, rng)
        if text and text != captions.full_caption(scene):
            return text


def _kind_phase_context(index: int, rng: np.random.Generator, phase: str) -> str:
    """Recipe 4's naming context in `phase` (KIND_PHASE_MIX): the object words of the scene's kind
    without positions or background, sorted (`blue square , red circle`: a query and its support
    then end in the same words, the easiest match) or shuffled; the full caption; the context mix."""
    from projects.miniworld import captions, scenes

    source = int(rng.choice(4, p=KIND_PHASE_MIX[phase]))
    if source == 2:
        return _context(index, rng, clean=True)
    if source == 3:
        return _context(index, rng)
    segs = captions.object_segments(scenes.scene_from_index(index), positions=False)
    segs = sorted(set(segs)) if source == 0 else [segs[int(i)] for i in rng.permutation(len(segs))]
    return captions.SEGMENT_SEP.join(segs)


def _train_scene(rng: np.random.Generator) -> int:
    from projects.miniworld import scenes

    return int(scenes.sample_indices(rng, 1, "train")[0])


def vqa_example(rng: np.random.Generator, recipe: int = 2) -> tuple[str, list[tuple[int, int]]]:
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
        context = "" if pseudo and j < k else _context(index, rng, recipe=recipe)
        lines.append((prompts.vqa_line(context, q), f" {a}{prompts.ANSWER_END}"))
    return _join(lines, range(len(lines)))


def classify_example(rng: np.random.Generator, simple: bool = False,
                     copy: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """An open-ended N-way K-shot naming of scene kinds (task induction once, at the start, half the
    time), then QUERIES answered queries; the loss reads the queries' answers. The names are drawn
    per episode (`support.episode`), so only copying the matching support's name lowers the loss.
    `simple`: the curriculum's 2/3-way 1-shot episodes on clean captions, two queries. `copy`
    (recipe 3's first naming phase): 2/3/5-way 1-shot episodes on clean captions whose queries repeat
    a support's scene and description word for word, so matching is plain copying."""
    if copy:
        ways, shots, n_queries = int(rng.choice([2, 3, 5])), 1, QUERIES
        described: dict[int, str] = {}
        return _naming_text(rng, ways, shots, n_queries,
                            lambda i: described.setdefault(i, _context(i, rng, True)), copy=True)
    if simple:
        ways, shots, n_queries = int(rng.choice([2, 3])), 1, 2
    else:
        ways = int(rng.choice([2, 3, 5], p=[0.2, 0.3, 0.5]))
        shots, n_queries = (1 if rng.random() < 0.85 else 2), QUERIES
    return _naming_text(rng, ways, shots, n_queries, lambda i: _context(i, rng, simple))


def _naming_text(rng: np.random.Generator, ways: int, shots: int, n_queries: int,
                 context: Any, copy: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The episode of a random train query, then `n_queries` answered queries (`context(i)`: a
    scene's description); shared by every recipe (the same draws in the same order). `copy`: the
    queries are support scenes themselves."""
    from dediffusion_jax.fewshot import prompts, support
    from projects.miniworld import fewshot_tasks, scenes

    kinds = fewshot_tasks.kinds_of_split("train")
    query = _train_scene(rng)
    ep = support.episode(fewshot_tasks.scene_kind(scenes.scene_from_index(query)), kinds, ways, shots,
                         seed=int(rng.integers(2**31)), key="train")
    names = ep.names if rng.random() < 0.5 else None
    name_of = {fewshot_tasks.scene_kind(scenes.scene_from_index(int(i))): n for i, n in ep.support}
    if copy:
        queries = [ep.support[int(rng.integers(len(ep.support)))] for _ in range(n_queries)]
        items = [(int(i), n) for i, n in ep.support] + [(int(i), n) for i, n in queries]
        lines = [(prompts.classify_line(context(i), None, names if j == 0 else None),
                  f" {n}{prompts.CLASS_END}") for j, (i, n) in enumerate(items)]
        return _join(lines, range(len(ep.support), len(lines)))
    queries = [(query, ep.answer)]
    for _ in range(n_queries - 1):  # more answered queries of the episode's classes: more signal per text
        kind = sorted(name_of)[int(rng.integers(len(name_of)))]
        pool = kinds[kind]
        queries.append((pool[int(rng.integers(len(pool)))], name_of[kind]))
    items = [(int(i), n) for i, n in ep.support] + queries
    lines = [(prompts.classify_line(context(i), None, names if j == 0 else None),
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


def simple_example(rng: np.random.Generator, naming: bool = True, copy: bool = False,
                   weights: tuple[float, ...] | None = LOOKUP_WEIGHTS) -> tuple[str, list[tuple[int, int]]]:
    """The curriculum's texts: one VQA line whose context is the full caption (70%) or its segments
    shuffled (30%), question types drawn with LOOKUP_WEIGHTS: every answer is in the context, so the
    look-up is all there is to learn; with `naming`, half are 2/3-way 1-shot naming episodes on such
    captions (copying the matching support's name; `copy`: recipe 3's copy episodes).
    `weights`: the question types' (None: uniform)."""
    from dediffusion_jax.fewshot import prompts
    from projects.miniworld import fewshot_tasks, scenes

    if naming and rng.random() < 0.5:
        return classify_example(rng, simple=not copy, copy=copy)
    index = _train_scene(rng)
    _, q, a = fewshot_tasks.random_question(scenes.scene_from_index(index), rng, weights)
    return _join([(prompts.vqa_line(_context(index, rng, clean=True), q), f" {a}{prompts.ANSWER_END}")], [0])


def copying_example(rng: np.random.Generator) -> tuple[str, list[tuple[int, int]]]:
    """Recipe 5's copying text: INDUCT_WORDS random words (the world's, the distractors, the made-up
    names), in which a segment of INDUCT_SEGMENT words recurs at a random distance; the loss reads the
    recurrence after its first word. Neither the distance nor the segment's place is fixed, so only
    matching what came before (an induction head) predicts it: the skill naming needs, which the
    App.-B texts alone did not form in this model (docs/fewshot.md, "Recipe 5")."""
    from dediffusion_jax.fewshot.support import MADE_UP_NAMES
    from projects.miniworld.captions import SEGMENT_SEP, WORLD_WORDS
    from projects.miniworld.tokenizer import DISTRACTORS

    pool = (*WORLD_WORDS, *DISTRACTORS, *MADE_UP_NAMES, SEGMENT_SEP.strip())
    words = [pool[int(i)] for i in rng.integers(len(pool), size=INDUCT_WORDS)]
    m = int(rng.integers(INDUCT_SEGMENT[0], INDUCT_SEGMENT[1] + 1))
    first = int(rng.integers(0, INDUCT_WORDS - 2 * m + 1))
    second = int(rng.integers(first + m, INDUCT_WORDS - m + 1))
    words[second:second + m] = words[first:first + m]
    start = len(" ".join(words[:second + 1]))  # the recurrence after its first word
    end = len(" ".join(words[:second + m]))
    return " ".join(words), [(start, end)]


def example(rng: np.random.Generator, simple: bool = False, naming_share: float = 0.5,
            lookup: bool = False, recipe: int = 2, copy: bool = False,
            induct: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """One training text: VQA or (`naming_share`) classification; `simple`: the curriculum's kind
    (`lookup`: its first phase, VQA only; `copy`, recipe 3: its copying phase). Recipe 1: 75% VQA,
    25% classification, exactly as the committed model was trained. Recipe 4: `naming_share` 2/3/5-way
    1-shot naming episodes whose contexts come from its phase (`lookup`: the kind's object words,
    `simple`: KIND_PHASE_MIX['objects'], else ['all']), the rest recipe 1's VQA texts. Recipe 5: only
    `copying_example` texts while `induct`, then recipe 4's texts with INDUCT_SHARE of them."""
    if recipe == 1:
        if simple:
            return _simple_example_v1(rng)
        return vqa_example(rng, recipe=1) if rng.random() < 0.75 else _classify_example_v1(rng)
    if recipe == 5:
        if induct or rng.random() < INDUCT_SHARE:
            return copying_example(rng)
        recipe = 4
    if recipe == 4:
        if rng.random() >= naming_share:
            return vqa_example(rng, recipe=1)
        phase = "kind" if lookup else "objects" if simple else "all"
        ways = int(rng.choice([2, 3, 5], p=[0.2, 0.3, 0.5]))
        return _naming_text(rng, ways, 1, QUERIES, lambda i: _kind_phase_context(i, rng, phase))
    if recipe == 3 and (simple or lookup):
        return simple_example(rng, naming=not lookup, copy=copy, weights=None)
    if simple or lookup:
        return simple_example(rng, naming=not lookup)
    return classify_example(rng) if rng.random() < naming_share else vqa_example(rng)


def _classify_example_v1(rng: np.random.Generator) -> tuple[str, list[tuple[int, int]]]:
    """Recipe 1's naming episode (`classify_example` before recipe 2, unchanged)."""
    ways = int(rng.choice([2, 3, 5]))
    shots = 1 if rng.random() < 0.8 else 2
    return _naming_text(rng, ways, shots, QUERIES_V1, lambda i: _context(i, rng, recipe=1))


def _simple_example_v1(rng: np.random.Generator) -> tuple[str, list[tuple[int, int]]]:
    """Recipe 1's curriculum text (`simple_example` before recipe 2, unchanged)."""
    from dediffusion_jax.fewshot import prompts
    from projects.miniworld import captions, fewshot_tasks, scenes

    scene = scenes.scene_from_index(_train_scene(rng))
    segs = captions.object_segments(scene) + [captions.background_segment(scene)]
    if rng.random() < 0.3:
        segs = [segs[int(i)] for i in rng.permutation(len(segs))]
    _, q, a = fewshot_tasks.random_question(scene, rng)
    return _join([(prompts.vqa_line(captions.SEGMENT_SEP.join(segs), q), f" {a}{prompts.ANSWER_END}")], [0])


TASKS = ("naming", "vqa", "copying")


def task_of(text: str) -> str:
    """A training text's task (for the per-task accuracies in metrics.jsonl)."""
    from dediffusion_jax.fewshot import prompts

    if text.startswith(prompts.VQA_INSTRUCTION):
        return "vqa"
    return "naming" if "Classification:" in text else "copying"


def is_naming(text: str) -> bool:
    """Whether a training text is a naming episode."""
    return task_of(text) == "naming"


# ------------------------------------------------------------------------------- tokenizer and model


def build_tokenizer(seed: int, n_texts: int = 3000, vocab_size: int = 640, recipe: int = 1) -> Any:
    """A byte-level BPE (GPT-2's scheme) learned from the world's training text: any string encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from projects.miniworld.captions import WORLD_WORDS
    from projects.miniworld.tokenizer import DISTRACTORS

    rng = np.random.default_rng([seed, 2**31])
    texts = [example(rng, recipe=recipe)[0] for _ in range(n_texts)] + [" ".join(WORLD_WORDS + DISTRACTORS)]
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
    """input_ids / attention_mask / labels / is_answer (1 on answer tokens) / task (the rows' index in
    TASKS), right-padded, cut at MAX_LEN; labels are -100 on padding."""
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
            "labels": torch.from_numpy(labels), "is_answer": torch.from_numpy(is_answer),
            "task": torch.tensor([TASKS.index(task_of(t)) for t in texts]).reshape(-1, 1)}


def batch_of_step(tokenizer: Any, seed: int, step: int, batch: int, simple_steps: int = 0,
                  naming_share: float = 0.5, lookup_steps: int = 0, recipe: int = 2,
                  induct_steps: int = 0) -> list[dict[str, Any]]:
    """The batch of a step, a pure function of (seed, step), as MICRO micro-batches of similar
    lengths (each padded to its own longest text); the first `simple_steps` steps are the curriculum's."""
    rng = np.random.default_rng([seed, step])
    copy = recipe == 3 and step < (lookup_steps + simple_steps) // 2  # recipe 3: the first half of naming
    examples = sorted((example(rng, step < simple_steps, naming_share, step < lookup_steps, recipe, copy,
                               step < induct_steps)
                       for _ in range(batch)),
                      key=lambda e: len(e[0]))
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
    from transformers import PreTrainedTokenizerFast

    if not (tok_dir / "tokenizer.json").exists():
        tok = (PreTrainedTokenizerFast.from_pretrained(args.init) if args.init
               else build_tokenizer(args.seed, recipe=args.recipe))
        tok.save_pretrained(str(tok_dir))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    special = tokenizer.convert_tokens_to_ids(SPECIAL)
    if args.init:  # float16 weights, trained on in float32 (safetensors only)
        model = LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32, use_safetensors=True,
                                                 local_files_only=True)
    else:
        model = LlamaForCausalLM(model_config(len(tokenizer), special))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    item = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "lm_weight": args.lm_weight,
            "simple_steps": args.simple_steps}
    if args.recipe != 1:  # recipe 1's record is the committed model's
        item.update(naming_share=args.naming_share, lookup_steps=args.lookup_steps, recipe=args.recipe)
    if args.recipe == 5:
        item["induct_steps"] = args.induct_steps
    if args.init:
        item["init"] = str(args.init)
    ckpt = workdir / "state.safetensors"
    step = _load_state(ckpt, model, opt, item) if ckpt.exists() else 0
    log = open(workdir / "metrics.jsonl", "a")
    wall = json.loads((workdir / "wall.json").read_text())["seconds"] if (workdir / "wall.json").exists() else 0.0
    start, last = time.time(), time.time()
    model.train()
    task_hits, task_n = dict.fromkeys(TASKS, 0), dict.fromkeys(TASKS, 0)  # since the last log line
    stop_at = min(args.steps, step + args.stop_after_steps) if args.stop_after_steps else args.steps
    while step < stop_at:
        micro = batch_of_step(tokenizer, args.seed, step, args.batch, args.simple_steps, args.naming_share,
                              args.lookup_steps, args.recipe, args.induct_steps)
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.steps, args.lr)
        opt.zero_grad(set_to_none=True)
        n_answer = sum(int(m["is_answer"].sum()) for m in micro)
        n_other = sum(int((m["labels"] != -100).sum()) for m in micro) - n_answer
        loss_sum, hits = 0.0, 0
        for m in micro:  # means over the whole batch's answer / other tokens, whatever the grouping
            labels, is_answer = m.pop("labels")[:, 1:], m.pop("is_answer")[:, 1:]
            task = m.pop("task")
            logits = model(**m).logits[:, :-1].float()
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=-100, reduction="none").reshape(labels.shape)
            answer_ce = (ce * is_answer).sum()
            ((answer_ce / n_answer) + args.lm_weight * (ce * ~is_answer).sum() / max(1, n_other)).backward()
            loss_sum += float(answer_ce.detach())
            right = (logits.argmax(-1) == labels) & is_answer
            hits += int(right.sum())
            for index, key in enumerate(TASKS):  # answer-token accuracy per task
                rows = task == index
                task_hits[key] += int((right & rows).sum())
                task_n[key] += int((is_answer & rows).sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0 or step == stop_at:
            rec = {"step": step, "loss": round(loss_sum / n_answer, 5), "answer_token_acc": round(hits / n_answer, 4),
                   **{f"{k}_acc": round(task_hits[k] / task_n[k], 4) for k in task_n if task_n[k]},
                   "seconds": round(wall + time.time() - start, 1)}
            task_hits, task_n = dict.fromkeys(TASKS, 0), dict.fromkeys(TASKS, 0)
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
    for name, value in DEFAULTS[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "batch", "threads", "save_every"):
        if getattr(args, name) < 1:
            raise errors.UserError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.naming_share <= 1.0:
        raise errors.UserError("--naming-share must be in [0, 1]")
    if (args.recipe in (4, 5)) != bool(args.init):
        raise errors.UserError("--init is recipes 4 and 5's (and they need it): the model folder to start "
                               "from, e.g. projects/miniworld/assets/llm_recipe1")
    if args.induct_steps is None:
        args.induct_steps = 0
    elif args.recipe != 5:
        raise errors.UserError("--induct-steps is recipe 5's")
    if args.induct_steps < 0:
        raise errors.UserError("--induct-steps must be >= 0")
    if args.init and not (Path(args.init) / "model.safetensors").is_file():
        raise errors.UserError(f"--init {args.init}: no model.safetensors there (a model folder such as "
                               "projects/miniworld/assets/llm_recipe1)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(args)
    return 0


if __name__ == "__main__":
    answer_help_early(build_parser)
    sys.exit(main())
