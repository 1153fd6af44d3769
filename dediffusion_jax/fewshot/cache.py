"""Answers on disk, so a rerun of an evaluation (or an interrupted one) asks the model nothing twice.

The cache is a JSONL file of {"key", "output"}; the key is a hash of (model identity, prompt,
max_tokens, stop). Lines are appended and flushed one by one, so an interrupted run keeps every answer
it got; a torn last line is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from dediffusion_jax.fewshot.backends import LanguageModel


def cache_key(identity: str, prompt: str, max_tokens: int, stop: Sequence[str]) -> str:
    payload = json.dumps([identity, prompt, int(max_tokens), list(stop)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class AnswerCache:
    """key -> output, loaded from and appended to one JSONL file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.entries[row["key"]] = row["output"]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line from an interrupted write
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, output: str) -> None:
        with self._lock:
            self.entries[key] = output
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "output": output}, ensure_ascii=False) + "\n")


class CachedLLM:
    """A `LanguageModel` that asks the wrapped one only for prompts the cache lacks."""

    def __init__(self, llm: LanguageModel, cache: AnswerCache):
        self.llm, self.cache = llm, cache
        self.identity = llm.identity
        self.hits = self.misses = 0

    def complete(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        keys = [cache_key(self.identity, p, max_tokens, stop) for p in prompts]
        out: list[str | None] = [self.cache.get(k) for k in keys]
        todo = sorted({i for i, o in enumerate(out) if o is None}, key=lambda i: keys[i])
        unique: dict[str, int] = {}
        for i in todo:
            unique.setdefault(keys[i], i)
        self.hits += len(prompts) - len(todo)
        self.misses += len(unique)
        if unique:
            firsts = list(unique.values())
            answers = self.llm.complete([prompts[i] for i in firsts], max_tokens=max_tokens, stop=stop)
            for i, a in zip(firsts, answers):
                self.cache.put(keys[i], a)
        return [o if o is not None else self.cache.get(k) for o, k in zip(out, keys)]
