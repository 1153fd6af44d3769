"""The trainable De-Diffusion encoder: image backbone -> attentional pooler -> masked vocabulary logits.

The Gumbel-softmax, assembly and the decoder's embedding matmul live in `quantizer.py` and the train step,
so that this module is a plain deterministic image -> logits map (easy to test, shard and evaluate).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dediffusion_jax.models.pooler import AttentionalPooler
from dediffusion_jax.models.quantizer import VocabularyHead

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Pooler + head hyper-parameters. Defaults: the paper's 75 queries, 5 blocks; width 1024 / 16 heads /
    MLP ratio 4 are our choice (not stated in the paper; they match its 135M trainable parameters).

    `excluded_ids`: tokens never emitted (see `quantizer.vocabulary_exclusion_mask` / `excluded_ids`).
    `freeze_backbone`: stop the gradient at the backbone output (the train step also keeps the frozen
    parameters out of the optimizer). `vocab_size`: the decoder tokenizer's vocabulary (49,408 for CLIP).
    """

    vocab_size: int
    num_queries: int = 75
    pooler_blocks: int = 5
    pooler_width: int = 1024
    pooler_heads: int = 16
    mlp_ratio: int = 4
    excluded_ids: tuple[int, ...] = ()
    freeze_backbone: bool = True
    remat: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EncoderConfig:
        """From an ml_collections ConfigDict / dict; unknown keys raise (typos should not pass silently)."""
        values = dict(values)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown EncoderConfig keys: {unknown}")
        if "excluded_ids" in values:
            values["excluded_ids"] = tuple(int(i) for i in values["excluded_ids"])
        return cls(**values)


def backbone_tokens(output: Any) -> Array:
    """[B, T, D] tokens from a backbone's output: a plain array, or an object with `.tokens` (models/vit.py)."""
    tokens = getattr(output, "tokens", output)
    if not hasattr(tokens, "ndim") or tokens.ndim != 3:
        raise ValueError(f"backbone must return [B, T, D] tokens (or an object with .tokens), got {output!r:.200}")
    return tokens


class DeDiffusionEncoder(nn.Module):
    """images -> masked float32 logits [B, N, V] over the decoder's vocabulary.

    `backbone`: any linen module mapping images to [B, T, D] (or to an output with `.tokens`, as
    `models.vit.ViT`); it is registered as the submodule "backbone", the others as "pooler" and
    "vocab_head" (its Dense is params['vocab_head']['dense'], which `fused_soft_token_embeddings` takes).
    """

    backbone: nn.Module
    config: EncoderConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.pooler = AttentionalPooler(c.num_queries, c.pooler_blocks, c.pooler_width, c.pooler_heads,
                                        c.mlp_ratio, self.dtype, c.remat)
        self.vocab_head = VocabularyHead(c.vocab_size, c.excluded_ids, self.dtype)

    def features(self, images: Array) -> Array:
        """Pooler output [B, N, width], the input of the vocabulary head."""
        tokens = backbone_tokens(self.backbone(images))
        if self.config.freeze_backbone:
            tokens = jax.lax.stop_gradient(tokens)
        return self.pooler(tokens)

    def __call__(self, images: Array) -> Array:
        return self.vocab_head(self.features(images))
