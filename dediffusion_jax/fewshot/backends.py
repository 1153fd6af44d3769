"""One small interface to a language model, and `open_llm(spec)` that picks the backend.

    llm = open_llm("http://127.0.0.1:8080/v1")     # an OpenAI-compatible server (llama.cpp, vLLM, Ollama, TGI)
    llm = open_llm("/models/my-causal-lm")         # a local transformers folder (safetensors only)
    outputs = llm.complete(prompts, max_tokens=8, stop=("$", "\\n"))

`complete` is greedy (temperature 0) and returns one completion per prompt, in order, without the
prompt. `identity` names the model for the answer cache (`cache.CachedLLM`): two backends with the
same identity must give the same answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dediffusion_jax import errors


@runtime_checkable
class LanguageModel(Protocol):
    """A text-only model: prompts in, greedy completions out (cut at the first stop string)."""

    identity: str

    def complete(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]: ...


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string (servers do this; a local model must do it itself)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def open_llm(spec: str, **options: Any) -> LanguageModel:
    """`http(s)://HOST:PORT/v1` -> `HttpLLM`; a folder -> `LocalLLM`. Options go to the backend
    (HTTP: model, api, timeout, retries, concurrency; local: device, batch_size, dtype)."""
    if is_url(spec):
        from dediffusion_jax.fewshot.http_backend import HttpLLM

        return HttpLLM(spec, **{k: v for k, v in options.items() if k in HttpLLM.OPTIONS})
    if not Path(spec).expanduser().is_dir():
        raise errors.UserError(f"--llm {spec}: neither an http(s):// URL nor a model folder")
    from dediffusion_jax.fewshot.local_backend import LocalLLM

    return LocalLLM(spec, **{k: v for k, v in options.items() if k in LocalLLM.OPTIONS})
