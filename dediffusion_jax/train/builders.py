"""Config -> the objects of a run: backbone, encoder, De-Diffusion model, optimizer, schedules.

The config fields read here (see configs/*.py for full experiment files):
  backbone.variant       'B/16' style name (Ti/S/B/L/H + patch), used when backbone.init is empty
  backbone.image_size    input resolution of the backbone view
  backbone.init          '' (random init) or a local CLIP vision folder/safetensors (transformers
                         CLIPVisionModel layout); position embeddings are resized to image_size
  backbone.frozen        True: stop-gradient at its output and keep it out of the optimizer
  encoder.{num_queries, pooler_blocks, pooler_width, pooler_heads, mlp_ratio}
  vocab.exclude_punctuation, vocab.exclude_tokens (list of strings or ids), vocab.only_tokens
  quantizer.hard         straight-through Gumbel (exact one-hot forward) or soft relaxation
  quantizer.token_path   'fused' (memory-lean) or 'soft' (reference)
  quantizer.temperature.{schedule, start, end}   over total_steps
  loss.timestep_range    [lo, hi) fractions of the decoder's timesteps the loss samples
  loss.timestep_range_final, loss.timestep_ramp_fraction   optional curriculum: the window slides
                         linearly to timestep_range_final over that fraction of total_steps
  loss.reduction         'mean' (the decoder's loss) or 'log_mean' (mean log MSE per example)
  dtype, remat
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dediffusion_jax.models import quantizer, vit
from dediffusion_jax.models.encoder import DeDiffusionEncoder, EncoderConfig
from dediffusion_jax.t2i.folder import Decoder
from dediffusion_jax.train.model import DeDiffusion


def build_backbone(config: ml_collections.ConfigDict) -> tuple[vit.ViT, Any | None]:
    """The ViT module and its pretrained params (None for random init)."""
    b = config.backbone
    dtype = jnp.dtype(config.get("dtype", "float32"))
    if b.get("init"):
        vit_config, params = vit.load_clip_vision(b.init, image_size=int(b.image_size))
        return vit.ViT(vit_config, dtype=dtype, remat=bool(config.get("remat", False))), params
    vit_config = vit.ViTConfig.named(b.variant, image_size=int(b.image_size))
    overrides = b.get("overrides", None)
    # Unset overrides are 0/None/'' (config files cannot override None fields from the command line).
    overrides = {k: v for k, v in dict(overrides or {}).items() if v not in (None, 0, "")}
    if overrides:
        import dataclasses

        vit_config = dataclasses.replace(vit_config, **overrides)
    return vit.ViT(vit_config, dtype=dtype, remat=bool(config.get("remat", False))), None


def build_model(
    config: ml_collections.ConfigDict, decoder: Decoder
) -> tuple[DeDiffusion, Any, Any | None]:
    """(model, `init_params(rng) -> encoder params` (random), pretrained backbone params or None).

    The pretrained backbone is returned separately (not closed over by `init_params`) so that jitted
    initialisation never embeds hundreds of MB of weights as constants.
    """
    backbone, pretrained = build_backbone(config)
    mask = quantizer.vocabulary_exclusion_mask(
        decoder.tokenizer,
        exclude_punctuation=bool(config.vocab.exclude_punctuation),
        extra_excluded_tokens=tuple(config.vocab.get("exclude_tokens", ()) or ()),
        only_tokens=tuple(config.vocab.get("only_tokens", ()) or ()),
    )
    e = config.encoder
    enc_config = EncoderConfig(
        vocab_size=decoder.text_config.vocab_size,
        num_queries=int(e.num_queries),
        pooler_blocks=int(e.pooler_blocks),
        pooler_width=int(e.pooler_width),
        pooler_heads=int(e.pooler_heads),
        mlp_ratio=int(e.get("mlp_ratio", 4)),
        excluded_ids=quantizer.excluded_ids(mask),
        freeze_backbone=bool(config.backbone.frozen),
        remat=bool(config.get("remat", False)),
    )
    encoder = DeDiffusionEncoder(backbone, enc_config, dtype=jnp.dtype(config.get("dtype", "float32")))
    q = config.quantizer
    model = DeDiffusion(
        encoder,
        decoder,
        hard=bool(q.hard),
        token_path=str(q.token_path),
        rows_per_chunk=int(q.get("rows_per_chunk", 16)),
        diversity_weight=float(q.get("diversity_weight", 0.0)),
        **loss_fields(config),
    )
    size = int(config.backbone.image_size)
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)

    def init_params(rng: jax.Array) -> Any:
        return encoder.init(rng, dummy)["params"]

    return model, init_params, pretrained


def loss_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """DeDiffusion's loss fields from config.loss: timestep_range, reduction, and the optional
    curriculum timestep_range_final (None/empty = off) reached after timestep_ramp_fraction of
    total_steps."""
    loss = config.get("loss", {})
    fields: dict[str, Any] = dict(
        timestep_range=tuple(float(x) for x in loss.get("timestep_range", (0.0, 1.0))),
        reduction=str(loss.get("reduction", "mean")))
    final = loss.get("timestep_range_final", None)
    if final:
        fraction = float(loss.get("timestep_ramp_fraction", 1.0))
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"loss.timestep_ramp_fraction={fraction} must be in (0, 1]")
        fields["timestep_range_final"] = tuple(float(x) for x in final)
        fields["timestep_ramp_steps"] = max(1, int(round(fraction * int(config.total_steps))))
    return fields


def build_temperature_fn(config: ml_collections.ConfigDict):
    t = config.quantizer.temperature
    return quantizer.temperature_schedule(
        str(t.schedule), float(t.start), float(t.end), int(config.total_steps)
    )
