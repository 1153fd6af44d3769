"""A minimal OpenAI-compatible server for a local model folder: what the HTTP backend talks to.

    python -m dediffusion_jax.fewshot.serve --model projects/miniworld/assets/llm --port 8000
    python -m dediffusion_jax.fewshot --llm http://127.0.0.1:8000/v1 ...

It answers `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions` (greedy, the
request's `stop` and `max_tokens`; the chat prompt is the last user message), one request at a time.
Enough to run the few-shot CLI over HTTP against a real model without llama.cpp or vLLM; the tests
start it on localhost with a `before_request` hook that injects delays and errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dediffusion_jax import errors


class HttpFault(Exception):
    """Raised by a `before_request` hook: answer with this status instead."""

    def __init__(self, status: int, message: str = "injected fault"):
        super().__init__(message)
        self.status = status


Hook = Callable[[str, dict], None]


def make_server(llm: Any, host: str = "127.0.0.1", port: int = 0, model_name: str = "local",
                before_request: Hook | None = None) -> ThreadingHTTPServer:
    """A server (not started: call `serve_forever`, e.g. in a thread) answering with `llm`."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout)

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            try:
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if before_request is not None:
                    before_request(self.path, payload)
                chat = self.path.rstrip("/").endswith("/chat/completions")
                if not chat and not self.path.rstrip("/").endswith("/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                prompt = ([m for m in payload["messages"] if m.get("role") == "user"][-1]["content"]
                          if chat else payload["prompt"])
                stop = payload.get("stop") or []
                stop = [stop] if isinstance(stop, str) else list(stop)
                with lock:
                    text = llm.complete([prompt], max_tokens=int(payload.get("max_tokens", 16)), stop=stop)[0]
            except HttpFault as e:
                return self._send(e.status, {"error": {"message": str(e)}})
            except (KeyError, IndexError, TypeError, ValueError) as e:
                return self._send(400, {"error": {"message": f"bad request: {e}"}})
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                      if chat else {"index": 0, "text": text, "finish_reason": "stop"})
            self._send(200, {"object": "chat.completion" if chat else "text_completion",
                             "model": model_name, "choices": [choice]})

    return ThreadingHTTPServer((host, port), Handler)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dediffusion_jax.fewshot.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a transformers causal-LM folder (safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from dediffusion_jax.fewshot.local_backend import LocalLLM

    llm = LocalLLM(args.model, device=args.device, batch_size=1)
    server = make_server(llm, args.host, args.port, model_name=llm.folder.name)
    print(f"serving {llm.folder} at http://{args.host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    return errors.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
