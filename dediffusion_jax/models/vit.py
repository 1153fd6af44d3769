"""The De-Diffusion image backbone: a pre-LN ViT returning every output token.

Why this shape: the attentional pooler cross-attends to all image tokens, so the backbone returns
[B, T, D], not a pooled vector. The module is a CLIP vision tower (transformers' CLIPVisionModel names:
`vision_model/embeddings/{patch_embedding,class_embedding,position_embedding}`, `vision_model/pre_layrnorm`
(sic), `vision_model/encoder/layers_{i}/...`, `vision_model/post_layernorm`), so pre-trained CLIP / OpenCLIP
towers saved by transformers as safetensors load through `convert.torch_to_flax`, and the same module
trains from scratch at the named sizes Ti..H. The encoder block is shared with the text encoder
(`dediffusion_jax.t2i.clip_text.CLIPEncoder`).

Outputs (`ViTOutput`), relative to transformers' CLIPVisionModel:
- `last_hidden_state`: the encoder output [B, 1 + P, D] WITHOUT post_layernorm, exactly transformers'
  `last_hidden_state`;
- `pooler_output`: post_layernorm(CLS state), exactly transformers' `pooler_output` (None without CLS);
- `tokens`: post_layernorm applied to every token ([CLS +] patches, per `config.output_tokens`): what the
  De-Diffusion pooler consumes. A pre-LN transformer's residual stream is un-normalised; the final norm,
  which CLIP only applies to CLS, is the natural read-out for all tokens (as big_vision's ViT does).

Images are NHWC floats [B, H, W, C] (the JAX convention), already normalised the way the checkpoint
expects (CLIP: mean/std normalisation). transformers takes NCHW: transpose (0, 3, 1, 2) to compare.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dediffusion_jax import weights
from dediffusion_jax.t2i import convert
from dediffusion_jax.t2i.clip_text import CLIPEncoder, check_activation, layer_norm

Array = jax.Array
Dtype = Any

log = logging.getLogger(__name__)

TORCH_IGNORE: tuple[str, ...] = (r"(^|\.)position_ids$",)
# transformers v5 saves CLIPVisionModel without the `vision_model.` prefix that published checkpoints have.
TORCH_ALIASES: dict[str, str] = {
    r"^(embeddings|encoder|pre_layrnorm|post_layernorm)\.": r"vision_model.\1."
}
# Extra tensors of a full CLIPModel checkpoint that the vision tower does not use.
_CLIP_MODEL_EXTRAS: tuple[str, ...] = (r"^text_model\.", r"^(visual|text)_projection\.", r"^logit_scale$")

# name -> (width, depth, heads); mlp is 4x width.
VARIANTS: dict[str, tuple[int, int, int]] = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape of the backbone. `use_cls_token`: the model has a CLS token (CLIP towers do);
    `output_tokens`: "all" returns [CLS +] patches, "patches" drops CLS from `tokens`."""

    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    use_cls_token: bool = True
    output_tokens: str = "all"

    def __post_init__(self):
        check_activation("hidden_act", self.hidden_act)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.output_tokens not in ("all", "patches"):
            raise ValueError(f"output_tokens={self.output_tokens!r}; expected 'all' or 'patches'")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.use_cls_token)

    @property
    def num_output_tokens(self) -> int:
        return self.num_patches + int(self.use_cls_token and self.output_tokens == "all")

    @classmethod
    def named(cls, name: str, image_size: int = 224, **overrides: Any) -> ViTConfig:
        """`ViTConfig.named("B/16")`: variant Ti, S, B, L or H with any patch size."""
        m = re.fullmatch(r"(Ti|S|B|L|H)/(\d+)", name)
        if not m:
            raise ValueError(f"ViT name {name!r}; expected '<variant>/<patch>' with variant in {list(VARIANTS)}")
        width, depth, heads = VARIANTS[m.group(1)]
        return cls(
            **{
                "image_size": image_size,
                "patch_size": int(m.group(2)),
                "hidden_size": width,
                "num_layers": depth,
                "num_heads": heads,
                "mlp_dim": 4 * width,
                **overrides,
            }
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> ViTConfig:
        """Reads a transformers CLIPVisionConfig config.json (or a CLIPConfig's `vision_config`)."""
        if "vision_config" in d and "hidden_size" not in d:
            d = d["vision_config"]
        mapping = {
            "image_size": "image_size",
            "patch_size": "patch_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "mlp_dim": "intermediate_size",
            "hidden_act": "hidden_act",
            "layer_norm_eps": "layer_norm_eps",
            "num_channels": "num_channels",
        }
        kwargs = {ours: d[theirs] for ours, theirs in mapping.items() if d.get(theirs) is not None}
        if "hidden_act" in kwargs:
            check_activation("hidden_act", kwargs["hidden_act"])
        kwargs.setdefault("hidden_act", "quick_gelu")  # transformers' CLIPVisionConfig default
        return cls(**{**kwargs, "use_cls_token": True, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A config.json that transformers.CLIPVisionModel loads (only models with a CLS token)."""
        if not self.use_cls_token:
            raise ValueError("use_cls_token=False has no transformers CLIPVisionModel equivalent")
        return {
            "architectures": ["CLIPVisionModel"],
            "model_type": "clip_vision_model",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.mlp_dim,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "num_channels": self.num_channels,
            "attention_dropout": 0.0,
        }


@flax.struct.dataclass
class ViTOutput:
    """See the module docstring for how each field relates to transformers' CLIPVisionModel."""

    tokens: Array
    last_hidden_state: Array
    pooler_output: Array | None = None
    hidden_states: tuple[Array, ...] | None = None


class CLIPVisionEmbeddings(nn.Module):
    config: ViTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        c = self.config
        x = nn.Conv(
            c.hidden_size,
            (c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            name="patch_embedding",
        )(pixel_values.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, c.hidden_size)  # row-major over the grid, as torch's flatten(2)
        if c.use_cls_token:
            cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), x], axis=1)
        pos = nn.Embed(
            c.num_positions, c.hidden_size, embedding_init=nn.initializers.normal(0.02), name="position_embedding"
        ).embedding
        return x + pos.astype(self.dtype)[None]


class CLIPVisionTransformer(nn.Module):
    config: ViTConfig
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array, output_hidden_states: bool = False) -> ViTOutput:
        c = self.config
        if pixel_values.shape[1:] != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(
                f"pixel_values shape {pixel_values.shape}: expected NHWC [B, {c.image_size}, {c.image_size}, "
                f"{c.num_channels}] (resize the position embeddings for another size: load_clip_vision)"
            )
        x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
        x = layer_norm(c.layer_norm_eps, self.dtype, "pre_layrnorm")(x)
        x, states = CLIPEncoder(
            c.num_layers, c.hidden_size, c.num_heads, c.mlp_dim, c.hidden_act, c.layer_norm_eps,
            self.remat, self.dtype, name="encoder",
        )(x)
        normed = layer_norm(c.layer_norm_eps, self.dtype, "post_layernorm")(x)
        pooled = normed[:, 0] if c.use_cls_token else None
        tokens = normed[:, 1:] if (c.use_cls_token and c.output_tokens == "patches") else normed
        return ViTOutput(tokens, x, pooled, states if output_hidden_states else None)


class ViT(nn.Module):
    """pixel_values [B, H, W, C] -> ViTOutput; `tokens` is [B, config.num_output_tokens, D].

    `dtype`: compute dtype (params float32). `remat`: recompute each encoder layer in the backward pass."""

    config: ViTConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, pixel_values: Array, output_hidden_states: bool = False) -> ViTOutput:
        return CLIPVisionTransformer(self.config, self.remat, self.dtype, name="vision_model")(
            pixel_values, output_hidden_states
        )


def dummy_inputs(config: ViTConfig, batch: int = 1) -> tuple[Array]:
    """Positional args for `init` / `jax.eval_shape`: zeros [batch, image_size, image_size, channels]."""
    return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels), jnp.float32),)


def abstract_params(config: ViTConfig) -> Any:
    """Param shapes without allocating, for `convert.torch_to_flax`."""
    model = ViT(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs(config)))["params"]


def resize_position_embedding(
    pos: Array | np.ndarray, old_grid: int, new_grid: int, has_cls: bool = True
) -> np.ndarray:
    """[(1 +) old_grid^2, D] -> [(1 +) new_grid^2, D]: the patch part resized bicubically on its 2-D
    grid (jax.image.resize), the CLS row kept. Why: a checkpoint trained at 224 used at 288."""
    pos = jnp.asarray(pos, jnp.float32)
    cls, patch = (pos[:1], pos[1:]) if has_cls else (pos[:0], pos)
    d = patch.shape[-1]
    if patch.shape[0] != old_grid**2:
        raise ValueError(f"position embedding has {patch.shape[0]} patch rows, expected {old_grid}^2")
    grid = jax.image.resize(patch.reshape(old_grid, old_grid, d), (new_grid, new_grid, d), method="bicubic")
    return np.asarray(jnp.concatenate([cls, grid.reshape(new_grid * new_grid, d)], axis=0))


def resize_position_embeddings(params: Mapping[str, Any], config: ViTConfig, image_size: int) -> tuple[ViTConfig, dict]:
    """Returns (config for `image_size`, params with the position table resized to its grid)."""
    new_config = dataclasses.replace(config, image_size=image_size)
    params = flax.core.unfreeze(params) if hasattr(params, "unfreeze") else jax.tree.map(lambda x: x, dict(params))
    emb = params["vision_model"]["embeddings"]["position_embedding"]
    emb["embedding"] = resize_position_embedding(
        emb["embedding"], config.grid_size, new_config.grid_size, config.use_cls_token
    )
    return new_config, params


def _read_state(path: Path) -> tuple[dict[str, np.ndarray], Path]:
    """(tensors, the folder holding config.json) of a CLIP folder or one of its .safetensors files."""
    folder = path if path.is_dir() else path.parent
    return weights.read(path, convert=weights.save_pretrained_command(folder)), folder


PREPROCESSOR_CONFIG = "preprocessor_config.json"  # transformers' CLIPImageProcessor file


def read_normalisation(folder_or_file: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(image_mean, image_std) in [0, 1] units that a CLIP folder's preprocessor_config.json records
    (what the tower was trained to see), or None when the folder has none."""
    path = Path(folder_or_file).expanduser()
    file = (path if path.is_dir() else path.parent) / PREPROCESSOR_CONFIG
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    mean, std = data.get("image_mean"), data.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        raise ValueError(f"{file}: image_mean and image_std must be lists of 3 numbers")
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def load_clip_vision(folder_or_file: str | Path, image_size: int | None = None) -> tuple[ViTConfig, dict]:
    """Loads a transformers CLIP vision tower (folder with config.json + model.safetensors, or the
    .safetensors file next to its config.json; a full CLIPModel checkpoint works too).

    If `image_size` differs from the checkpoint's, the patch position embeddings are resized bicubically
    (logged as a warning). Returns (config, params) with float32 numpy params.
    """
    path = Path(folder_or_file)
    state, folder = _read_state(path)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} (needed to build the model for {path})")
    config = ViTConfig.from_dict(json.loads(config_file.read_text()))
    params = convert.torch_to_flax(
        state,
        abstract_params(config),
        source=str(path),
        ignore=TORCH_IGNORE + _CLIP_MODEL_EXTRAS,
        aliases=TORCH_ALIASES,
    )
    if image_size is not None and image_size != config.image_size:
        log.warning(
            "load_clip_vision: checkpoint trained at %dpx (grid %d); resizing position embeddings bicubically "
            "to %dpx (grid %d)", config.image_size, config.grid_size, image_size, image_size // config.patch_size,
        )
        config, params = resize_position_embeddings(params, config, image_size)
    return config, params
