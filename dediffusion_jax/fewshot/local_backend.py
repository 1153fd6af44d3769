"""A local transformers causal LM as the few-shot model: greedy, batched, CPU or GPU, safetensors only.

    llm = LocalLLM("/models/my-lm", device="auto", batch_size=32)

The folder is what `save_pretrained` writes (config.json, *.safetensors, tokenizer files); a folder
with only pickle weights (.bin, .pt, .ckpt) is refused. Prompts are sorted by length and batched with
left padding (so every prompt's last token is at the same place); on CPU the weights run in float32,
on a GPU in the folder's dtype (float16 / bfloat16).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dediffusion_jax import errors
from dediffusion_jax.fewshot.backends import cut_at_stop

_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files; a UserError when it has none (pickles are refused)."""
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        pickles = sorted(p.name for pat in _PICKLES for p in folder.glob(pat))
        hint = (f" (it has pickle weights {pickles[:3]}: load them once in Python and save_pretrained"
                "(..., safe_serialization=True) to convert)" if pickles else "")
        raise errors.UserError(f"{folder}: no *.safetensors weights{hint}")
    return found


def folder_identity(folder: Path) -> str:
    """Names the model by content, cheaply: config.json and the size, head and tail of each weight file."""
    h = hashlib.sha256((folder / "config.json").read_bytes() if (folder / "config.json").exists() else b"")
    for f in weight_files(folder):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return f"local:{folder.name}:{h.hexdigest()[:16]}"


class LocalLLM:
    """`LanguageModel` over a transformers folder."""

    OPTIONS = ("device", "batch_size", "dtype")

    def __init__(self, folder: str | os.PathLike, device: str = "auto", batch_size: int = 32,
                 dtype: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.folder = Path(folder).expanduser().resolve()
        if not (self.folder / "config.json").exists():
            raise errors.UserError(f"{self.folder}: not a transformers model folder (no config.json)")
        self.identity = folder_identity(self.folder)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if dtype == "auto":
            torch_dtype = torch.float32 if self.device == "cpu" else "auto"
        else:
            torch_dtype = getattr(torch, dtype)
        self.batch_size = int(batch_size)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(self.folder), use_safetensors=True, local_files_only=True, dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise errors.UserError(f"{self.folder}: cannot load the model: {e}") from e
        self.model.to(self.device).eval()

    def complete(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        """Greedy completions, batched by length; each cut at its first stop string."""
        import torch

        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self.tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id,
                                          stop_strings=list(stop) or None, tokenizer=self.tokenizer)
            new = gen[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, new):
                out[i] = cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), stop)
        return out

    def describe(self) -> dict[str, Any]:
        return {"backend": "local", "folder": str(self.folder), "device": self.device,
                "config": json.loads((self.folder / "config.json").read_text()).get("model_type")}
