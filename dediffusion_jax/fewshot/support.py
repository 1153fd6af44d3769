"""Support sets drawn by seed from the train split, and open-ended N-way K-shot episodes.

Every draw is seeded by (seed, the query's key), so a query's support does not depend on the order of
the questions, on batching or on which other queries are evaluated (a rerun or a subset sees the same
prompts, and the answer cache hits).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

# Made-up class names for open-ended classification (the Frozen protocol names classes with nonsense
# words, so the model must bind a name to the support rather than recall one).
MADE_UP_NAMES = ("dax", "blicket", "wug", "zorb", "tufa", "gazzer", "kiki", "bouba", "fep", "toma",
                 "modi", "pimwit", "lorp", "zav", "dupe", "kell", "mib", "pilk", "sarn", "vonk")


def rng_for(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, key)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_support(pool: Sequence[T], k: int, seed: int, key: str) -> list[T]:
    """k examples drawn without replacement from `pool` (the train split) for the query `key`."""
    if k <= 0:
        return []
    if k > len(pool):
        raise ValueError(f"{k} shots asked for, the support pool has {len(pool)} examples")
    picks = rng_for(seed, key).choice(len(pool), size=k, replace=False)
    return [pool[int(i)] for i in picks]


@dataclasses.dataclass(frozen=True)
class Episode:
    """One N-way K-shot query: its support (item, name) in prompt order, the class names as the task
    induction lists them, and the name that is the right answer."""

    support: tuple[tuple[object, str], ...]
    names: tuple[str, ...]
    answer: str


def episode(query_label: str, pool_by_label: Mapping[str, Sequence[T]], ways: int, shots: int,
            seed: int, key: str, names: Sequence[str] = MADE_UP_NAMES) -> Episode:
    """The query's class plus ways-1 other classes, each with `shots` support items from the train
    pool, each class named by a made-up name drawn for this episode; support order shuffled."""
    rng = rng_for(seed, key)
    if query_label not in pool_by_label or len(pool_by_label[query_label]) < shots:
        raise ValueError(f"class {query_label!r} has fewer than {shots} support examples")
    others = sorted(lab for lab, items in pool_by_label.items()
                    if lab != query_label and len(items) >= shots)
    if len(others) < ways - 1 or ways > len(names):
        raise ValueError(f"{ways}-way needs {ways} classes with {shots} examples and {ways} names")
    classes = [query_label] + [others[int(i)] for i in rng.choice(len(others), ways - 1, replace=False)]
    class_names = [names[int(i)] for i in rng.choice(len(names), ways, replace=False)]
    support = []
    for label, name in zip(classes, class_names):
        items = pool_by_label[label]
        support += [(items[int(i)], name) for i in rng.choice(len(items), shots, replace=False)]
    order = rng.permutation(len(support))
    listed = tuple(class_names[int(i)] for i in rng.permutation(ways))
    return Episode(tuple(support[int(i)] for i in order), listed, class_names[0])
