"""The world's few-shot tasks: VQA questions about a scene, and scene kinds to name.

Question types (one answer each, unambiguous for the scene):
- colour: `What colour is the circle?` (`... the circle at the top left?` when the shape repeats)
- shape: `What shape is the red object?` (with the cell when the colour repeats)
- position: `Where is the red circle?` -> `top left` (only for a kind the scene has once)
- count: `How many objects are there?` -> `1` / `2`
- background: `What colour is the background?` -> `white`
- presence: `Is there a blue square?` -> `yes` / `no` (half and half; an absent kind drawn uniformly)

A scene kind is the set of its object kinds (`blue square + red circle`): positions and background
vary inside a kind, so naming a held-out scene's kind from one train example per class is the world's
open-ended N-way 1-shot classification (miniImageNet's role in the paper's ablations).
"""

from __future__ import annotations

import functools

import numpy as np

from projects.miniworld import scenes
from projects.miniworld.scenes import COLOURS, COLS, ROWS, SHAPES, Scene, SceneObject

QUESTION_TYPES = ("colour", "shape", "position", "count", "background", "presence")


def _cell(o: SceneObject) -> str:
    return f"{ROWS[o.row]} {COLS[o.col]}"


def question(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of one type for the scene, or None when the type has no unambiguous
    question here (position, when both objects are the same kind)."""
    objs = scene.objects
    o = objs[int(rng.integers(len(objs)))]
    if qtype == "colour":
        unique = sum(p.shape == o.shape for p in objs) == 1
        where = "" if unique else f" at the {_cell(o)}"
        return f"What colour is the {o.shape}{where}?", o.colour
    if qtype == "shape":
        unique = sum(p.colour == o.colour for p in objs) == 1
        where = "" if unique else f" at the {_cell(o)}"
        return f"What shape is the {o.colour} object{where}?", o.shape
    if qtype == "position":
        kinds = [(p.colour, p.shape) for p in objs]
        options = [p for p in objs if kinds.count((p.colour, p.shape)) == 1]
        if not options:
            return None
        o = options[int(rng.integers(len(options)))]
        return f"Where is the {o.colour} {o.shape}?", _cell(o)
    if qtype == "count":
        return "How many objects are there?", str(len(objs))
    if qtype == "background":
        return "What colour is the background?", scene.background
    if qtype == "presence":
        present = {(p.colour, p.shape) for p in objs}
        if rng.random() < 0.5:
            c, s = sorted(present)[int(rng.integers(len(present)))]
            return f"Is there a {c} {s}?", "yes"
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
        return f"Is there a {c} {s}?", "no"
    raise ValueError(f"unknown question type {qtype!r}; one of {QUESTION_TYPES}")


def random_question(scene: Scene, rng: np.random.Generator,
                    weights: tuple[float, ...] | None = None) -> tuple[str, str, str]:
    """(type, question, answer) of a uniformly drawn type (or drawn with `weights`, one per
    QUESTION_TYPES entry) that the scene can answer."""
    while True:
        if weights is None:
            qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
        else:
            qtype = QUESTION_TYPES[int(rng.choice(len(QUESTION_TYPES), p=weights))]
        qa = question(scene, qtype, rng)
        if qa is not None:
            return (qtype, *qa)


def scene_kind(scene: Scene) -> str:
    """The set of object kinds, sorted: `blue square + red circle`."""
    return " + ".join(sorted({f"{o.colour} {o.shape}" for o in scene.objects}))


@functools.lru_cache(maxsize=None)
def kinds_of_split(split: scenes.Split) -> dict[str, tuple[int, ...]]:
    """Scene indices of a split grouped by scene kind."""
    out: dict[str, list[int]] = {}
    for i in scenes.split_indices(split):
        out.setdefault(scene_kind(scenes.scene_from_index(int(i))), []).append(int(i))
    return {k: tuple(v) for k, v in sorted(out.items())}
