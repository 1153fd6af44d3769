"""Config -> the De-Diffusion model: backbone, encoder, `DeDiffusion` (what training AND inference
build; the optimizer and the temperature schedule are training-only and live in `train/`).

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
  loss.timestep_range    [lo, hi) fractions of the decoder's timesteps the loss samples
  loss.timestep_range_final, loss.timestep_ramp_fraction   optional curriculum: the window slides
                         linearly to timestep_range_final over that fraction of total_steps
  loss.reduction         'mean' (the decoder's loss) or 'log_mean' (mean log MSE per example)
  dtype, remat
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dediffusion_jax.data.preprocess import CLIP_MEAN, CLIP_STD
from dediffusion_jax.models import quantizer, vit
from dediffusion_jax.models.dediffusion import UNET_INPUT_GRAD_KERNELS, DeDiffusion
from dediffusion_jax.models.encoder import DeDiffusionEncoder, EncoderConfig
from dediffusion_jax.t2i import nn_blocks
from dediffusion_jax.t2i.folder import DecoderSpec


def build_backbone(config: ml_collections.ConfigDict,
                   vit_config: vit.ViTConfig | None = None) -> tuple[vit.ViT, Any | None]:
    """The ViT module and its pretrained params (None for random init, or when `vit_config` is
    given: then the module has that shape and no weights are read, as for an exported encoder)."""
    b = config.backbone
    pretrained = None
    if vit_config is None and b.get("init"):
        vit_config, pretrained = vit.load_clip_vision(b.init, image_size=int(b.image_size))
    elif vit_config is None:
        vit_config = vit.ViTConfig.named(b.variant, image_size=int(b.image_size))
        overrides = b.get("overrides", None)
        # Unset overrides are 0/None/'' (config files cannot override None fields from the command
        # line).
        overrides = {k: v for k, v in dict(overrides or {}).items() if v not in (None, 0, "")}
        if overrides:
            vit_config = dataclasses.replace(vit_config, **overrides)
    dtype = jnp.dtype(config.get("dtype", "float32"))
    return vit.ViT(vit_config, dtype=dtype, remat=bool(config.get("remat", False))), pretrained


def backbone_normalisation(config: ml_collections.ConfigDict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std), in [0, 1] pixel units, of the backbone view: what the BACKBONE expects.

    config.backbone.mean/std when set; else (runs from before these fields) data.preprocess.
    backbone_mean/std; else the backbone folder's preprocessor_config.json (backbone.init); else
    CLIP's, the paper's towers (and a random-init ViT's default).
    """
    b = config.backbone
    mean, std = tuple(b.get("mean", ()) or ()), tuple(b.get("std", ()) or ())
    if mean and std:
        return tuple(map(float, mean)), tuple(map(float, std))
    data = config.get("data", None)
    pre = data.get("preprocess", None) if data is not None else None
    if pre is not None and pre.get("backbone_mean", None) and pre.get("backbone_std", None):
        return tuple(map(float, pre.backbone_mean)), tuple(map(float, pre.backbone_std))
    if b.get("init"):
        found = vit.read_normalisation(b.init)
        if found is not None:
            return found
    return CLIP_MEAN, CLIP_STD


def with_backbone_normalisation(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with backbone.mean/std resolved (`backbone_normalisation`): what a run
    records in its checkpoint, so inference normalises as training did without the backbone folder."""
    mean, std = backbone_normalisation(config)
    out = ml_collections.ConfigDict(config.to_dict())
    with out.unlocked():
        out.backbone.mean, out.backbone.std = mean, std
    if config.is_locked:
        out.lock()
    return out


def build_model(
    config: ml_collections.ConfigDict, decoder: DecoderSpec, *,
    vit_config: vit.ViTConfig | None = None,
) -> tuple[DeDiffusion, Any, Any | None]:
    """(model, `init_params(rng) -> encoder params` (random), pretrained backbone params or None).

    `decoder` is the frozen decoder's static spec (its weights are the caller's `frozen["decoder"]`);
    the model's copy of it computes in config.dtype with config.remat (`decoder_spec_for`), so the
    run's precision and rematerialisation reach the text encoder, UNet and VAE as well as the encoder.
    The pretrained backbone is returned separately (not closed over by `init_params`) so that jitted
    initialisation never embeds hundreds of MB of weights as constants. `vit_config`: build the
    backbone with this shape instead of reading `backbone.init` (the weights come from elsewhere).
    """
    backbone, pretrained = build_backbone(config, vit_config)
    decoder = decoder_spec_for(config, decoder)
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
        rows_per_chunk=int(q.get("rows_per_chunk", 0)),
        chunk_budget_mb=float(q.get("chunk_budget_mb", quantizer.CHUNK_BUDGET_MB)),
        diversity_weight=float(q.get("diversity_weight", 0.0)),
        **loss_fields(config),
    )
    size = int(config.backbone.image_size)
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)

    def init_params(rng: jax.Array) -> Any:
        return encoder.init(rng, dummy)["params"]

    return model, init_params, pretrained


def decoder_spec_for(config: ml_collections.ConfigDict, decoder: DecoderSpec) -> DecoderSpec:
    """`decoder` computing in config.dtype with config.remat (params stay float32: flax casts them
    inside each module). The same object when nothing changes (a float32 run without remat reuses the
    loaded spec and its compiled programs); otherwise one new spec, made once per model (specs are
    static jit arguments hashed by identity)."""
    dtype = jnp.dtype(config.get("dtype", "float32"))
    remat = bool(config.get("remat", False))
    if jnp.dtype(decoder.dtype) == dtype and bool(getattr(decoder, "remat", False)) == remat:
        return decoder
    return dataclasses.replace(decoder, dtype=dtype, remat=remat)


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


def frozen_backbone(config: ml_collections.ConfigDict, init_params: Any,
                    pretrained: Any | None) -> dict[str, Any]:
    """{"backbone": params} when config.backbone.frozen, else {}: the pretrained backbone, or (the
    random frozen-backbone ablation) the init's backbone from key(config.seed), as training made it."""
    if not bool(config.backbone.frozen):
        return {}
    if pretrained is not None:
        return {"backbone": pretrained}
    key = jax.random.key(int(config.seed))
    return {"backbone": jax.jit(lambda k: init_params(k)["backbone"])(key)}


FLIP_CONV_KERNELS = ("auto", "on", "off")


def frozen_unet_input_grad_kernels(config: ml_collections.ConfigDict, unet_params: Any) -> dict[str, Any]:
    """{UNET_INPUT_GRAD_KERNELS: the frozen UNet's convolution kernels flipped once} when
    config.decoder.flip_conv_kernels asks for it, else {} (see t2i/custom_grads.py, "convolution").

    "auto" flips on CPU devices only: XLA:CPU copies every kernel flipped inside every call of the
    UNet's input gradient (-4.6% of the SD2-shaped UNet's forward + text gradient once they are made
    here, bench/README.md), while GPU and TPU convolution kernels read the kernel as it is, so there
    the copies would only cost memory (a second copy of the convolution kernels)."""
    mode = str(config.get("decoder", {}).get("flip_conv_kernels", "auto"))
    if mode not in FLIP_CONV_KERNELS:
        raise ValueError(f"decoder.flip_conv_kernels={mode!r}; choose one of {', '.join(FLIP_CONV_KERNELS)}")
    if mode == "off" or (mode == "auto" and jax.default_backend() != "cpu"):
        return {}
    return {UNET_INPUT_GRAD_KERNELS: jax.jit(nn_blocks.input_gradient_kernels)(unet_params)}
