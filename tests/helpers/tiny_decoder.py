"""Tiny random decoders in the SD 1.x / SD 2.x / pixel-space config families.

Why: tests (and parity checks against diffusers/transformers) need real diffusers-format folders
without downloading anything. These config dicts are written exactly as the reference libraries
write them, so the same dict builds a torch reference model and our Flax model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from dediffusion_jax.t2i import clip_text, schedules, unet, vae
from dediffusion_jax.t2i.folder import DecoderSpec, LoadedDecoder, load_tokenizer

_TEXT = {
    "vocab_size": 0,  # filled from the tokenizer
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}

_UNET_COMMON = {
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "cross_attention_dim": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}

FAMILIES: dict[str, dict[str, Any]] = {
    # SD 1.x: quick_gelu text encoder, int head "dim" (= number of heads), conv proj, epsilon, latent.
    "sd1": {
        "text": {**_TEXT},
        "unet": {
            **_UNET_COMMON,
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [16, 32],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": 2,
            "use_linear_projection": False,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "block_out_channels": [16, 32],
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "act_fn": "silu",
            "sample_size": 16,
            "scaling_factor": 0.18215,
        },
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon",
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "clip_sample": False,
            "timestep_spacing": "leading",
        },
    },
    # SD 2.x: gelu text encoder, list head dims, linear projection, upcast attention, v-prediction.
    "sd2": {
        "text": {**_TEXT, "hidden_act": "gelu"},
        "unet": {
            **_UNET_COMMON,
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [16, 32],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": [2, 4],
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        "vae": None,  # filled with the sd1 VAE below
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": "v_prediction",
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "clip_sample": False,
            "timestep_spacing": "leading",
        },
    },
    # Pixel space (like the paper's Imagen-style decoder and the miniature world's): 3 channels,
    # no VAE, cosine schedule, v-prediction.
    "pixel": {
        "text": {**_TEXT},
        "unet": {
            **_UNET_COMMON,
            "sample_size": 16,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": [16, 32],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": 4,
            "use_linear_projection": True,
        },
        "vae": None,
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "v_prediction",
            "set_alpha_to_one": True,
            "steps_offset": 0,
            "clip_sample": True,
            "clip_sample_range": 1.0,
            "timestep_spacing": "trailing",
        },
    },
}
FAMILIES["sd2"]["vae"] = copy.deepcopy(FAMILIES["sd1"]["vae"])


def family_configs(family: str, tokenizer: Any) -> dict[str, dict[str, Any] | None]:
    """Config dicts (reference-library format) of one family, sized to `tokenizer`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny decoder family {family!r}; choose from {sorted(FAMILIES)}")
    cfg = copy.deepcopy(FAMILIES[family])
    cfg["text"].update(
        vocab_size=len(tokenizer),
        max_position_embeddings=int(tokenizer.model_max_length),
        bos_token_id=int(tokenizer.bos_token_id),
        eos_token_id=int(tokenizer.eos_token_id),
        pad_token_id=int(tokenizer.pad_token_id),
    )
    return cfg


def random_decoder(
    family: str, tokenizer_dir: str | Path, *, seed: int = 0, context_length: int = 16
) -> LoadedDecoder:
    """A randomly initialised Flax decoder of a tiny family (for tests and the interim demo)."""
    tokenizer = load_tokenizer(Path(tokenizer_dir), context_length)
    cfg = family_configs(family, tokenizer)
    text_config = clip_text.CLIPTextConfig.from_dict(cfg["text"])
    unet_config = unet.UNetConfig.from_dict(cfg["unet"])
    vae_config = vae.VAEConfig.from_dict(cfg["vae"]) if cfg["vae"] else None
    schedule = schedules.NoiseSchedule.from_dict(cfg["scheduler"])
    keys = jax.random.split(jax.random.key(seed), 3)
    modules = {
        "text_encoder": (clip_text.CLIPTextModel(config=text_config), clip_text.dummy_inputs(text_config)),
        "unet": (unet.UNet2DConditionModel(config=unet_config), unet.dummy_inputs(unet_config)),
    }
    if vae_config is not None:
        modules["vae"] = (vae.AutoencoderKL(config=vae_config), vae.dummy_inputs(vae_config))
    params = {}
    for key, (name, (module, inputs)) in zip(keys, modules.items()):
        params[name] = jax.jit(lambda k, m=module, i=inputs: m.init(k, *i)["params"])(key)
    spec = DecoderSpec(None, text_config, unet_config, vae_config, schedule, tokenizer, jnp.float32)
    return LoadedDecoder(spec, params)


def save_random_decoder(family: str, path: str | Path, tokenizer_dir: str | Path, *,
                        seed: int = 0) -> Path:
    """`random_decoder` saved as a diffusers folder (with our writer, folder.save_decoder); -> path."""
    from dediffusion_jax.t2i.folder import save_decoder

    save_decoder(random_decoder(family, tokenizer_dir, seed=seed), path)
    return Path(path)


def write_reference_folder(
    family: str,
    path: str | Path,
    tokenizer_dir: str | Path,
    *,
    seed: int = 0,
    perturb: float = 0.05,
    context_length: int = 16,
) -> dict[str, Any]:
    """Builds a tiny family with the reference PyTorch classes and saves it as a diffusers folder.

    Why: the independent fixture for folder/pipeline parity. Each component is written by its own
    `save_pretrained(safe_serialization=True)` (transformers/diffusers, never our writer) plus a
    model_index.json as `StableDiffusionPipeline.save_pretrained` writes it. Every parameter is
    perturbed by `perturb * N(0, 1)`: diffusers zero-inits some convolutions, which would hide
    mapping bugs in whatever follows them. Needs torch, transformers and diffusers.

    Returns the torch components {"text_encoder", "unet", "vae" (None for pixel decoders),
    "scheduler", "tokenizer"} in eval mode.
    """
    import diffusers
    import torch
    import transformers

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        str(tokenizer_dir), model_max_length=context_length, local_files_only=True
    )
    cfg = family_configs(family, tokenizer)
    torch.manual_seed(seed)

    def _perturbed(model: Any) -> Any:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
        return model.eval()

    models: dict[str, Any] = {
        "text_encoder": _perturbed(
            transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["text"]))
        ),
        "unet": _perturbed(diffusers.UNet2DConditionModel(**cfg["unet"])),
        "vae": _perturbed(diffusers.AutoencoderKL(**cfg["vae"])) if cfg["vae"] else None,
        "scheduler": diffusers.DDIMScheduler(**cfg["scheduler"]),
        "tokenizer": tokenizer,
    }
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionPipeline" if cfg["vae"] else "DeDiffusionPixelDecoder",
        "_diffusers_version": diffusers.__version__,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    for name, model in models.items():
        if model is None:
            continue
        if name in ("text_encoder", "unet", "vae"):
            model.save_pretrained(str(root / name), safe_serialization=True)
        else:
            model.save_pretrained(str(root / name))
    if cfg["vae"]:
        index.update(
            vae=["diffusers", "AutoencoderKL"],
            safety_checker=[None, None],
            feature_extractor=[None, None],
            requires_safety_checker=False,
        )
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return models
