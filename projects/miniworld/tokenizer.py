"""A CLIP-style byte-level BPE tokenizer for the miniature world's language.

Laid out exactly like OpenAI CLIP's vocabulary so `transformers.CLIPTokenizer` loads it from a local
folder and every code path is the one a real Stable Diffusion folder takes: 256 byte symbols, the same
256 with '</w>', one entry per merge, then <|startoftext|> and <|endoftext|> last (pad = <|endoftext|>,
as in SD 1.x). Merges are learned deterministically from the world's words plus distractors until every
word is a single token, so the text the encoder writes is readable words, and punctuation masking has
real punctuation tokens to mask.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from dediffusion_jax.t2i.bpe import bytes_to_unicode
from projects.miniworld.captions import WORLD_WORDS

CONTEXT_LENGTH = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Words outside the world's grammar: the encoder may emit them, the decoder never saw them in a scene.
DISTRACTORS = (
    "a", "an", "the", "with", "on", "and", "of", "in", "is", "dog", "cat", "photo", "picture", "small",
    "large",
)  # fmt: skip
PUNCTUATION = (",", ".", ";", ":", "!", "?", "-", "'", '"', "(", ")")
DEFAULT_DIR = Path(__file__).with_name("assets") / "tokenizer"


def learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges over `words` (each counted once) until every word is one symbol.

    Most frequent pair first, ties broken by the pair's text, so two builds give identical files.
    """
    b2u = bytes_to_unicode()
    seqs = []
    for w in sorted(set(words)):
        sym = [b2u[b] for b in w.encode("utf-8")]
        sym[-1] += "</w>"
        seqs.append(sym)
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        counts: Counter[tuple[str, str]] = Counter()
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] += 1
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        new_seqs = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new_seqs.append(out)
        seqs = new_seqs
    return merges


def build_vocab(words: tuple[str, ...] = WORLD_WORDS + DISTRACTORS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's layout: bytes, bytes + '</w>', merges, then the two special tokens."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    merges = learn_merges(words)
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    if len(set(tokens)) != len(tokens):
        raise AssertionError("duplicate vocabulary entries")
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(out_dir: str | Path) -> Path:
    """Write vocab.json + merges.txt (+ tokenizer/special-token configs) deterministically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=None) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CONTEXT_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")
    return out


def load_tokenizer(path: str | Path | None = None, fast: bool = False):
    """The committed (or a freshly built) tokenizer through transformers, as for a real SD folder."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    cls = CLIPTokenizerFast if fast else CLIPTokenizer
    return cls.from_pretrained(
        str(path or DEFAULT_DIR), model_max_length=CONTEXT_LENGTH, pad_token=EOS, local_files_only=True
    )


def encode(tokenizer, texts: list[str]) -> np.ndarray:
    """Ids [B, 16], <|startoftext|> first, <|endoftext|> after the text and as padding."""
    enc = tokenizer(texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True)
    return np.asarray(enc["input_ids"], np.int32)


def word_token_ids(tokenizer) -> dict[str, int]:
    """Id of each world word and distractor (each is one '<word></w>' token)."""
    vocab = tokenizer.get_vocab()
    return {w: vocab[w + "</w>"] for w in WORLD_WORDS + DISTRACTORS}


def punctuation_token_ids(tokenizer) -> list[int]:
    """Ids of tokens without a letter or digit (CLIP's notion of punctuation for the paper's mask)."""
    return sorted(
        i
        for t, i in tokenizer.get_vocab().items()
        if t not in (BOS, EOS) and not any(ch.isalnum() for ch in t.replace("</w>", ""))
    )


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_DIR))
    print(build_tokenizer(p.parse_args().out))
