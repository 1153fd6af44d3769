"""An OpenAI-compatible server as the few-shot model: what llama.cpp's server, vLLM, Ollama and TGI
expose at `/v1/completions` and `/v1/chat/completions`.

    llm = HttpLLM("http://127.0.0.1:8080/v1", model=None, api="completions", timeout=60, retries=3,
                  concurrency=8)

Greedy (temperature 0) with the task's stop strings; one prompt per request, `concurrency` requests
in flight. A request that times out, cannot connect, or gets 429 / 5xx is retried up to `retries`
times with exponential back-off; any other HTTP error stops at once with the server's message. With
no `model` the first id of `GET /models` is used (vLLM wants the exact name; llama.cpp takes any).
Standard library only.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dediffusion_jax import errors
from dediffusion_jax.fewshot.backends import cut_at_stop

APIS = ("completions", "chat")


class ServerError(errors.UserError):
    """The server gave no usable answer (after the retries, or a request it refused)."""

    exit_code = 3


class _Retryable(Exception):
    pass


class HttpLLM:
    """`LanguageModel` over an OpenAI-compatible HTTP endpoint."""

    OPTIONS = ("model", "api", "timeout", "retries", "concurrency", "backoff")

    def __init__(self, base_url: str, model: str | None = None, api: str = "completions",
                 timeout: float = 60.0, retries: int = 3, concurrency: int = 8, backoff: float = 0.5):
        if api not in APIS:
            raise errors.UserError(f"--llm-api {api!r}: one of {APIS}")
        self.base_url = base_url.rstrip("/")
        self.api, self.timeout, self.retries = api, float(timeout), int(retries)
        self.concurrency, self.backoff = max(1, int(concurrency)), float(backoff)
        self.requests = self.retried = 0
        self.model = model or self._first_model()
        self.identity = f"http:{self.base_url}:{self.model}:{api}"

    # -- transport ---------------------------------------------------------------------------------

    def _once(self, path: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(self.base_url + path, data=data,
                                     headers={"Content-Type": "application/json"},
                                     method="GET" if payload is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", "replace")[:300]
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {body}") from e
            raise ServerError(f"{self.base_url}{path}: HTTP {e.code}: {body}") from e
        except (TimeoutError, socket.timeout) as e:
            raise _Retryable(f"no answer within {self.timeout:g} s") from e
        except (urllib.error.URLError, ConnectionError) as e:
            raise _Retryable(f"cannot connect: {getattr(e, 'reason', e)}") from e
        except ValueError as e:  # not JSON
            raise _Retryable(f"not a JSON answer: {e}") from e

    def request(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """One call with the retry policy; a ServerError names the URL and the last failure."""
        last = ""
        for attempt in range(self.retries + 1):
            self.requests += 1
            try:
                return self._once(path, payload)
            except _Retryable as e:
                last = str(e)
                if attempt < self.retries:
                    self.retried += 1
                    time.sleep(self.backoff * 2**attempt)
        raise ServerError(f"{self.base_url}{path}: no answer after {self.retries + 1} tries ({last})")

    def _first_model(self) -> str:
        models = self.request("/models").get("data") or []
        if not models:
            raise ServerError(f"{self.base_url}/models lists no model; name one with --llm-model")
        return str(models[0]["id"])

    # -- the interface -----------------------------------------------------------------------------

    def _complete_one(self, prompt: str, max_tokens: int, stop: Sequence[str]) -> str:
        common = {"model": self.model, "max_tokens": int(max_tokens), "temperature": 0.0,
                  "stop": list(stop)}
        if self.api == "chat":
            out = self.request("/chat/completions",
                               {**common, "messages": [{"role": "user", "content": prompt}]})
            text = out["choices"][0]["message"]["content"]
        else:
            text = self.request("/completions", {**common, "prompt": prompt})["choices"][0]["text"]
        return cut_at_stop(text or "", stop)

    def complete(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        """Greedy completions, `concurrency` requests at a time, in the prompts' order."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda p: self._complete_one(p, max_tokens, stop), prompts))
