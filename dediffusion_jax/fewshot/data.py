"""The files the few-shot evaluation reads.

- texts: JSONL, one {"id", "text"} per image (what `python -m dediffusion_jax.encode` writes; any
  other captioner's output in the same shape is another text source).
- VQA questions: JSONL, one {"image_id", "question", "answers": [...] (or "answer": "..."),
  "question_type"?, "question_id"?, "split"?: "train" | "eval" (default "eval")} per question. The
  support set is drawn from the "train" rows (or from a separate `--support` file).
- classification items: JSONL, one {"image_id", "label", "split"?} per image; the support classes and
  examples come from the "train" rows.
- captioning images: JSONL, one {"image_id", "captions": [...], "split"?} per image; the "train" rows
  are the support pool (a shot shows the image's first caption), the others are scored by CIDEr-D
  against all their captions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dediffusion_jax import errors


class DataError(errors.UserError, ValueError):
    """A texts / questions file that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Question:
    question_id: str
    image_id: str
    question: str
    answers: tuple[str, ...]
    question_type: str = ""
    split: str = "eval"


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to classify (or to support a class)."""

    image_id: str
    label: str
    split: str = "eval"


@dataclasses.dataclass(frozen=True)
class Captioned:
    """One image with its reference captions."""

    image_id: str
    captions: tuple[str, ...]
    split: str = "eval"


def _rows(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{n}: not JSON ({e})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object")
            yield n, row


def read_texts(path: str | os.PathLike) -> dict[str, str]:
    """image id -> text."""
    out = {}
    for n, row in _rows(path):
        if "id" not in row or not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{n}: a texts row needs \"id\" and \"text\"")
        out[str(row["id"])] = row["text"]
    return out


def read_questions(path: str | os.PathLike) -> list[Question]:
    """Every question of a VQA file, in file order."""
    out = []
    for n, row in _rows(path):
        answers = row.get("answers", [row["answer"]] if "answer" in row else None)
        if "image_id" not in row or not isinstance(row.get("question"), str) or not answers:
            raise DataError(f"{path}:{n}: a question needs \"image_id\", \"question\" and "
                            "\"answers\" (or \"answer\")")
        out.append(Question(str(row.get("question_id", f"{Path(path).name}:{n}")), str(row["image_id"]),
                            row["question"], tuple(str(a) for a in answers),
                            str(row.get("question_type", "")), str(row.get("split", "eval"))))
    return out


def read_items(path: str | os.PathLike) -> list[Item]:
    """Every item of a classification file."""
    out = []
    for n, row in _rows(path):
        if "image_id" not in row or "label" not in row:
            raise DataError(f"{path}:{n}: a classification row needs \"image_id\" and \"label\"")
        out.append(Item(str(row["image_id"]), str(row["label"]), str(row.get("split", "eval"))))
    return out


def read_captioned(path: str | os.PathLike) -> list[Captioned]:
    """Every image of a captioning file, in file order."""
    out = []
    for n, row in _rows(path):
        caps = row.get("captions")
        if "image_id" not in row or not isinstance(caps, list) or not caps \
                or not all(isinstance(c, str) and c.strip() for c in caps):
            raise DataError(f"{path}:{n}: a captioning row needs \"image_id\" and \"captions\": a "
                            "non-empty list of non-empty strings")
        out.append(Captioned(str(row["image_id"]), tuple(caps), str(row.get("split", "eval"))))
    return out


def check_texts(texts: Mapping[str, str], image_ids: set[str], source: str) -> None:
    """Every image the evaluation needs has a text in the source (first few missing ids named)."""
    missing = sorted(image_ids - texts.keys())
    if missing:
        raise DataError(f"text source {source!r} has no text for {len(missing)} image(s), e.g. "
                        f"{missing[:3]}")


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Rows as JSONL, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path
