"""Scoring the model's output: the answer before `$` (before the period for classification), exact
match after normalisation, the VQA accuracy metric, and the per-question-type breakdown.

Normalisation follows the spirit of the official VQAv2 evaluation (lower case, punctuation removed,
number words as digits, articles dropped, whitespace collapsed), without its long contraction table.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

from dediffusion_jax.fewshot.prompts import ANSWER_END, CLASS_END, SHOT_SEPARATOR

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def answer_of(output: str, task: str = "vqa") -> str:
    """The answer in a completion: the text before `$` (classification: before the period), first
    line only, stripped."""
    end = CLASS_END if task == "classify" else ANSWER_END
    return output.split(end, 1)[0].split(SHOT_SEPARATOR, 1)[0].strip()


def normalize(answer: str) -> str:
    """Lower case, no punctuation, number words as digits, no articles, single spaces."""
    words = _PUNCT.sub(" ", answer.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize(prediction) == normalize(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction against the human answers.

    With several answers (VQAv2 has 10) it is the official min(1, matches / 3), averaged over the
    leave-one-out subsets of the answers, so 3 or more agreeing humans give 1.0; with one answer (a
    generated dataset such as the miniature world's) it is exact match.
    """
    if not answers:
        raise ValueError("a question needs at least one answer")
    pred = normalize(prediction)
    norm = [normalize(a) for a in answers]
    if len(norm) == 1:
        return float(pred == norm[0])
    scores = []
    for i in range(len(norm)):
        others = norm[:i] + norm[i + 1:]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(scores) / len(scores)


def breakdown(scores: Iterable[float], types: Iterable[str]) -> dict[str, dict[str, float]]:
    """Mean score and count overall and per question type: {"all": {...}, TYPE: {"accuracy", "n"}}."""
    groups: dict[str, list[float]] = defaultdict(list)
    for s, t in zip(scores, types):
        groups["all"].append(float(s))
        groups[t or "other"].append(float(s))
    return {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(groups.items())}
