"""The paper's few-shot prompt formats (App. B), verbatim, and how shots are laid out.

Each format is one line in the paper:
- VQA: `Answer the question given the context. Image context: <text> Image question: <q> Short answer: <a>$`
- captioning: `MS COCO image captioning. Image context: <text> MS COCO image caption: <cap>$`
- classification with task induction: `Classify the context into "lion" or "vase". Context: <text>
  Classification: lion.` (without induction the first sentence is dropped).

Layout (the paper says "the shots repeated, then the query with an empty answer"; the separator is not
stated, so this is our choice): every VQA / caption shot is one complete instance of the line, answer
included; the query is the same line cut after its answer field's colon; lines are joined with a
newline. Classification states its task once, as Frozen's task induction does: the induction sentence
opens the first line (that line is then exactly the paper's example) and the other lines are
`Context: <text> Classification: <name>.`. A blank context renders as `Image context: Image
question: ...` (one space, not two).

Zero-shot uses pseudo samples (`pseudo_shots`): support examples whose image context is left blank,
so they show the format and nothing of any image. For N > 2 classes the induction sentence lists the
names as English does: `"a", "b" or "c"` (the paper shows two).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

VQA_INSTRUCTION = "Answer the question given the context."
CAPTION_INSTRUCTION = "MS COCO image captioning."
ANSWER_END = "$"          # the end of a VQA / caption answer
CLASS_END = "."           # the end of a classification answer
SHOT_SEPARATOR = "\n"
TASKS = ("vqa", "caption", "classify")


@dataclasses.dataclass(frozen=True)
class Shot:
    """One support example: the image's text, the question (VQA only) and the answer."""

    context: str
    answer: str
    question: str = ""


def _field(label: str, value: str) -> str:
    value = " ".join(value.split())
    return f"{label}: {value}" if value else f"{label}:"


def vqa_line(context: str, question: str, answer: str | None = None) -> str:
    """One VQA example; `answer=None` is the query (ends at `Short answer:`)."""
    head = " ".join([VQA_INSTRUCTION, _field("Image context", context),
                     _field("Image question", question), "Short answer:"])
    return head if answer is None else f"{head} {answer}{ANSWER_END}"


def caption_line(context: str, caption: str | None = None) -> str:
    """One captioning example; `caption=None` is the query."""
    head = " ".join([CAPTION_INSTRUCTION, _field("Image context", context), "MS COCO image caption:"])
    return head if caption is None else f"{head} {caption}{ANSWER_END}"


def induction(names: Sequence[str]) -> str:
    """`Classify the context into "lion" or "vase".` for any number of names (>= 1)."""
    quoted = [f'"{n}"' for n in names]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f"Classify the context into {listed}."


def classify_line(context: str, label: str | None = None,
                  names: Sequence[str] | None = None) -> str:
    """One classification example; `names` given: with task induction; `label=None`: the query."""
    parts = ([induction(names)] if names else []) + [_field("Context", context), "Classification:"]
    head = " ".join(parts)
    return head if label is None else f"{head} {label}{CLASS_END}"


def layout(shot_lines: Sequence[str], query_line: str) -> str:
    """The shots, each a complete line, then the query."""
    return SHOT_SEPARATOR.join([*shot_lines, query_line])


def pseudo_shots(shots: Sequence[Shot]) -> list[Shot]:
    """Zero-shot support: the same questions and answers with the image context blank."""
    return [dataclasses.replace(s, context="") for s in shots]


def vqa_prompt(context: str, question: str, shots: Sequence[Shot] = ()) -> str:
    """A k-shot VQA prompt (k = len(shots)) for one query."""
    return layout([vqa_line(s.context, s.question, s.answer) for s in shots], vqa_line(context, question))


def caption_prompt(context: str, shots: Sequence[Shot] = ()) -> str:
    """A k-shot captioning prompt."""
    return layout([caption_line(s.context, s.answer) for s in shots], caption_line(context))


def classify_prompt(context: str, shots: Sequence[Shot], names: Sequence[str] | None = None) -> str:
    """An N-way K-shot classification prompt; `names`: the task induction's class names (None: none),
    stated once at the start."""
    lines = [classify_line(s.context, s.answer, names if i == 0 else None) for i, s in enumerate(shots)]
    return layout(lines, classify_line(context, None, None if shots else names))


def stop_strings(task: str) -> tuple[str, ...]:
    """What ends the model's answer: `$` (VQA, captions) or the period (classification); a newline
    always (the next line would be another example)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {TASKS}")
    return (CLASS_END if task == "classify" else ANSWER_END, SHOT_SEPARATOR)
