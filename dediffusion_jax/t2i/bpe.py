"""CLIP/GPT-2 byte-level BPE facts shared by the quantizer's vocabulary mask and project tokenizers.

Standard library only, so a config file that needs a tokenizer's words does not import jax.
"""

from __future__ import annotations


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (its order defines a BPE vocabulary's
    first 256 ids); the one copy in the project (the quantizer and the miniature world's tokenizer use it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))
