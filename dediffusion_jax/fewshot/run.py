"""The few-shot evaluation: every text source x every number of shots, through one language model.

For each query the support is drawn by (seed, question id or image id, k) from the train split, so
every text source sees the same support questions and images; only the texts differ (a paired
comparison).
k = 0 is the paper's zero-shot: `pseudo_shots` support examples with the image context left blank.
A text source whose every text is "" is the blank query (the model's prior).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dediffusion_jax.fewshot import cider, prompts, scoring, support
from dediffusion_jax.fewshot.backends import LanguageModel
from dediffusion_jax.fewshot.data import Captioned, Item, Question, check_texts

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class VqaSettings:
    shots: tuple[int, ...] = (0, 4, 32)
    pseudo_shots: int = 2
    seed: int = 0
    max_tokens: int = 8


def vqa_prompts(questions: Sequence[Question], pool: Sequence[Question], texts: Mapping[str, str],
                k: int, settings: VqaSettings) -> list[str]:
    """One prompt per question: k shots from the pool (k = 0: pseudo samples), then the query."""
    out = []
    for q in questions:
        picked = _support(pool, q.question_id, k, settings)
        # pseudo samples (k = 0) blank the support context, so a source needs no text for the pool
        shots = [prompts.Shot(texts[s.image_id] if k > 0 else "", s.answers[0], s.question) for s in picked]
        out.append(prompts.vqa_prompt(texts[q.image_id], q.question, _pseudo(shots, k)))
    return out


def _support(pool: Sequence[Any], key: str, k: int, settings: VqaSettings) -> list[Any]:
    """k examples for the query `key` (k = 0: `pseudo_shots` of them), drawn by (seed, key, k)."""
    return support.sample_support(pool, k if k > 0 else settings.pseudo_shots, settings.seed, f"{key}/{k}")


def _pseudo(shots: list[prompts.Shot], k: int) -> list[prompts.Shot]:
    return prompts.pseudo_shots(shots) if k == 0 else shots


def _check_sources(sources: Mapping[str, Mapping[str, str]], queries: Sequence[Any], pool: Sequence[Any],
                   shots: Sequence[int]) -> None:
    """Every text source has a text for every query image (and every pool image when k > 0)."""
    needed = {q.image_id for q in queries}
    if any(k > 0 for k in shots):
        needed |= {q.image_id for q in pool}
    for name, texts in sources.items():
        check_texts(texts, needed, name)


def evaluate_vqa(llm: LanguageModel, questions: Sequence[Question], pool: Sequence[Question],
                 sources: Mapping[str, Mapping[str, str]], settings: VqaSettings,
                 progress: Progress | None = None) -> dict[str, Any]:
    """{"sources": {name: {k: breakdown}}, "predictions": [...]}; breakdown = scoring.breakdown."""
    _check_sources(sources, questions, pool, settings.shots)
    results: dict[str, dict[str, Any]] = {}
    predictions = []
    for name, texts in sources.items():
        results[name] = {}
        for k in settings.shots:
            batch = vqa_prompts(questions, pool, texts, k, settings)
            answers = ask(llm, batch, "vqa", settings.max_tokens)
            scores = [scoring.vqa_accuracy(a, q.answers) for a, q in zip(answers, questions)]
            results[name][str(k)] = scoring.breakdown(scores, [q.question_type for q in questions])
            predictions += [{"source": name, "shots": k, "question_id": q.question_id,
                             "prediction": a, "answers": list(q.answers), "score": s}
                            for q, a, s in zip(questions, answers, scores)]
            _report(progress, f"{name}, {k}-shot", results[name][str(k)])
    return {"sources": results, "predictions": predictions}


@dataclasses.dataclass(frozen=True)
class CaptionSettings(VqaSettings):
    max_tokens: int = 32    # a COCO caption is ~10 words; the answer stops at `$` or a newline


def caption_prompts(images: Sequence[Captioned], pool: Sequence[Captioned], texts: Mapping[str, str],
                    k: int, settings: CaptionSettings) -> list[str]:
    """One prompt per image: k support images with their first caption (k = 0: pseudo samples)."""
    out = []
    for it in images:
        shots = [prompts.Shot(texts[s.image_id], s.captions[0]) for s in _support(pool, it.image_id, k, settings)]
        out.append(prompts.caption_prompt(texts[it.image_id], _pseudo(shots, k)))
    return out


def evaluate_caption(llm: LanguageModel, images: Sequence[Captioned], pool: Sequence[Captioned],
                     sources: Mapping[str, Mapping[str, str]], settings: CaptionSettings,
                     progress: Progress | None = None) -> dict[str, Any]:
    """{"sources": {name: {k: {"all": {"cider", "n"}}}}, "predictions": [...]}: CIDEr-D over `images`,
    its document frequencies from their reference captions (as the COCO evaluation of a split)."""
    _check_sources(sources, images, pool, settings.shots)
    refs = [it.captions for it in images]
    results: dict[str, dict[str, Any]] = {}
    predictions = []
    for name, texts in sources.items():
        results[name] = {}
        for k in settings.shots:
            captions = ask(llm, caption_prompts(images, pool, texts, k, settings), "caption", settings.max_tokens)
            scores = cider.cider_d(captions, refs)
            results[name][str(k)] = {"all": {"cider": sum(scores) / len(scores), "n": len(scores)}}
            predictions += [{"source": name, "shots": k, "image_id": it.image_id, "prediction": c,
                             "captions": list(it.captions), "score": s}
                            for it, c, s in zip(images, captions, scores)]
            if progress:
                progress(f"{name}, {k}-shot: CIDEr {results[name][str(k)]['all']['cider']:.3f}")
    return {"sources": results, "predictions": predictions}


def ask(llm: LanguageModel, batch: Sequence[str], task: str, max_tokens: int) -> list[str]:
    """The model's answers to the prompts: each output cut before its end mark."""
    outputs = llm.complete(batch, max_tokens=max_tokens, stop=prompts.stop_strings(task))
    return [scoring.answer_of(o, task) for o in outputs]


def _report(progress: Progress | None, what: str, cell: Mapping[str, Any]) -> None:
    if progress:
        progress(f"{what}: {cell['all']['accuracy']:.3f}")


@dataclasses.dataclass(frozen=True)
class ClassifySettings:
    ways: int = 5
    shots: tuple[int, ...] = (1,)
    induction: tuple[bool, ...] = (True, False)
    seed: int = 0
    max_tokens: int = 8


def column(ways: int, k: int, induction: bool) -> str:
    return f"{ways}-way {k}-shot" + (", induction" if induction else ", no induction")


def classify_prompts(items: Sequence[Item], pool: Sequence[Item], texts: Mapping[str, str], k: int,
                     induction: bool, settings: ClassifySettings) -> tuple[list[str], list[str]]:
    """(prompts, the made-up name that is right for each)."""
    by_label: dict[str, list[Item]] = {}
    for it in pool:
        by_label.setdefault(it.label, []).append(it)
    out, answers = [], []
    for j, it in enumerate(items):
        ep = support.episode(it.label, by_label, settings.ways, k, settings.seed, f"{it.image_id}/{j}/{k}")
        shots = [prompts.Shot(texts[s.image_id], name) for s, name in ep.support]
        out.append(prompts.classify_prompt(texts[it.image_id], shots, ep.names if induction else None))
        answers.append(ep.answer)
    return out, answers


def evaluate_classify(llm: LanguageModel, items: Sequence[Item], pool: Sequence[Item],
                      sources: Mapping[str, Mapping[str, str]], settings: ClassifySettings,
                      progress: Progress | None = None) -> dict[str, Any]:
    """Open-ended N-way K-shot accuracy with made-up names, with and without task induction."""
    if any(k < 1 for k in settings.shots):
        raise ValueError("open-ended classification needs at least 1 shot per class")
    for name, texts in sources.items():
        check_texts(texts, {it.image_id for it in [*items, *pool]}, name)
    results: dict[str, dict[str, Any]] = {}
    predictions = []
    for name, texts in sources.items():
        results[name] = {}
        for k in settings.shots:
            for ind in settings.induction:
                batch, right = classify_prompts(items, pool, texts, k, ind, settings)
                answers = ask(llm, batch, "classify", settings.max_tokens)
                scores = [scoring.exact_match(a, r) for a, r in zip(answers, right)]
                col = column(settings.ways, k, ind)
                results[name][col] = scoring.breakdown(scores, ["" for _ in scores])
                predictions += [{"source": name, "setting": col, "image_id": it.image_id, "label": it.label,
                                 "prediction": a, "answer": r, "score": s}
                                for it, a, r, s in zip(items, answers, right, scores)]
                _report(progress, f"{name}, {col}", results[name][col])
    return {"sources": results, "predictions": predictions}
