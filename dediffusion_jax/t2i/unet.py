"""Flax port of diffusers' `UNet2DConditionModel` (the Stable Diffusion 1.x / 2.x UNet family).

Why our own: diffusers dropped its Flax models in v0.40, and De-Diffusion needs the frozen UNet in JAX,
differentiable w.r.t. the text states. Submodule names mirror the torch state-dict keys, so
`convert.torch_to_flax` / `flax_to_torch` load and save diffusers checkpoints directly
(`down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight` <->
`down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_out_0/kernel`).

Layout: images are NHWC (Flax convention), not NCHW as in diffusers. `sample` is [B, H, W, in_channels]
and the prediction is [B, H, W, out_channels]. Any H, W work (non-multiples of 2**num_upsamplers are
upsampled to the skip connection's size, as diffusers does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dediffusion_jax.t2i.nn_blocks import (
    Downsample2D,
    ResnetBlock2D,
    TextTimeEmbedding,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    conv,
    group_norm,
    timestep_embedding,
)

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# The UNet has no buffers: every torch state-dict entry is a parameter.
TORCH_IGNORE: tuple[str, ...] = ()

# Options of diffusers' UNet2DConditionModel this port does not implement: key -> accepted values.
# A config with any other value is rejected with the key named, instead of silently computing
# something else. (SDXL-style additions, class conditioning, GLIGEN, ...)
_ONLY_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None, "text"),
    "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "dual_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "reverse_transformer_layers_per_block": (None,),
    "act_fn": ("silu", "swish"),
}


def _unsupported(key: str, value: Any, supported: Any) -> ValueError:
    return ValueError(f"unet config: unsupported {key} = {value!r}; supported: {supported}")


def _per_block(key: str, value: Any, n: int, kind: type = int) -> tuple:
    """An int (same for every block) or a list of n values -> a tuple of n values."""
    if isinstance(value, kind) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == n and all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    ):
        return tuple(value)
    raise _unsupported(key, value, f"a {kind.__name__} or a list of {n} {kind.__name__}s")


def _as_config_value(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The subset of diffusers' UNet2DConditionModel config that SD 1.x / 2.x style UNets use.

    Per-block options (`layers_per_block`, `attention_head_dim`, `num_attention_heads`,
    `transformer_layers_per_block`) keep the form of the config.json (int or tuple); use the
    `*_per_block` properties for the expanded values.

    diffusers' naming quirk: when `num_attention_heads` is None, `attention_head_dim` is the NUMBER of
    heads and the head dim is channels // heads. `heads_per_block` resolves this.
    """

    sample_size: int | tuple[int, ...] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # diffusers' "text" addition embedding: the pooled text states are added to the time embedding.
    addition_embed_type: str | None = None
    addition_embed_type_num_heads: int = 64
    # Project extension, not a diffusers option: a learned position embedding [H*W, C] (zero-init)
    # added to the tokens of every transformer after proj_in, so attention queries know where they
    # are. A decoder that uses it only runs at its trained resolution, and diffusers ignores the key
    # and the `pos_embed` weights (it then computes a different model). Written to config.json only
    # when true, so stock configs round-trip unchanged.
    attention_position_embedding: bool = False

    def __post_init__(self) -> None:
        n = len(self.down_block_types)
        for i, t in enumerate(self.down_block_types):
            if t not in DOWN_BLOCK_TYPES:
                raise _unsupported(f"down_block_types[{i}]", t, DOWN_BLOCK_TYPES)
        for i, t in enumerate(self.up_block_types):
            if t not in UP_BLOCK_TYPES:
                raise _unsupported(f"up_block_types[{i}]", t, UP_BLOCK_TYPES)
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise _unsupported("mid_block_type", self.mid_block_type, MID_BLOCK_TYPES)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError(
                "unet config: down_block_types, up_block_types and block_out_channels must have the "
                f"same length, got {n}, {len(self.up_block_types)}, {len(self.block_out_channels)}")
        for key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            _per_block(key, getattr(self, key), n)
        if self.num_attention_heads is not None:
            _per_block("num_attention_heads", self.num_attention_heads, n)
        for key in ("conv_in_kernel", "conv_out_kernel"):
            k = getattr(self, key)
            if not isinstance(k, int) or k < 1 or k % 2 == 0:
                raise _unsupported(key, k, "an odd positive int")
        if not isinstance(self.norm_num_groups, int) or isinstance(self.norm_num_groups, bool):
            raise _unsupported("norm_num_groups", self.norm_num_groups, "an int")
        if self.addition_embed_type == "text" and self.cross_attention_dim % self.addition_embed_type_num_heads:
            raise ValueError(
                f"unet config: cross_attention_dim = {self.cross_attention_dim} is not divisible by "
                f"addition_embed_type_num_heads = {self.addition_embed_type_num_heads}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"unet config: block_out_channels {self.block_out_channels} are not "
                                 f"all divisible by norm_num_groups = {self.norm_num_groups}")

    # ---------------------------------------------------------------------------- expanded values
    @property
    def layers_per_block_list(self) -> tuple[int, ...]:
        return _per_block("layers_per_block", self.layers_per_block, len(self.down_block_types))

    @property
    def transformer_layers_per_block_list(self) -> tuple[int, ...]:
        return _per_block("transformer_layers_per_block", self.transformer_layers_per_block,
                          len(self.down_block_types))

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        """Number of attention heads of each down block (diffusers' num_attention_heads quirk)."""
        return _per_block("attention_head_dim", self._heads, len(self.down_block_types))

    @property
    def _heads(self) -> int | tuple[int, ...]:
        return self.attention_head_dim if self.num_attention_heads is None else self.num_attention_heads

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    # --------------------------------------------------------------------------------- json i/o
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """Reads a diffusers UNet2DConditionModel config.json (as a dict).

        Keys this port does not need are ignored; a value it cannot honour raises ValueError naming it.
        """
        for key, allowed in _ONLY_DEFAULTS.items():
            if key in d and d[key] not in allowed:
                raise _unsupported(key, d[key], allowed)
        only_cross = d.get("only_cross_attention", False)
        if only_cross not in (False, None) and not (
            isinstance(only_cross, Sequence) and not any(only_cross)
        ):
            raise _unsupported("only_cross_attention", only_cross, (False,))
        cross_dim = d.get("cross_attention_dim", 1280)
        if isinstance(cross_dim, Sequence) and not isinstance(cross_dim, str):
            if len(set(cross_dim)) != 1:
                raise _unsupported("cross_attention_dim", cross_dim, "an int (one text encoder)")
            cross_dim = cross_dim[0]
        tlpb = d.get("transformer_layers_per_block", 1)
        if isinstance(tlpb, Sequence) and any(not isinstance(t, int) for t in tlpb):
            raise _unsupported("transformer_layers_per_block", tlpb, "an int or a list of ints")
        if d.get("norm_num_groups", 32) is None:
            raise _unsupported("norm_num_groups", None, "an int")

        def tup(v: Any) -> Any:
            return tuple(v) if isinstance(v, (list, tuple)) else v

        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tup(v) for k, v in d.items() if k in fields}
        kwargs["cross_attention_dim"] = cross_dim
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A config.json that diffusers' UNet2DConditionModel loads.

        diffusers refuses `num_attention_heads` (its naming quirk), so heads are always written as
        `attention_head_dim` with `num_attention_heads` None: the same model.
        """
        out: dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            out[f.name] = _as_config_value(getattr(self, f.name))
        out["attention_head_dim"] = _as_config_value(self._heads)
        out["num_attention_heads"] = None
        out.update(
            act_fn="silu", only_cross_attention=False, dual_cross_attention=False,
            resnet_time_scale_shift="default", time_embedding_type="positional",
            attention_type="default", class_embed_type=None,
        )
        if not self.attention_position_embedding:
            del out["attention_position_embedding"]
        return out


# ------------------------------------------------------------------------------------- U-Net blocks


class _Blocks(nn.Module):
    """Shared fields of down/mid/up blocks."""

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    heads: int = 1
    transformer_layers: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    position_embedding: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32

    def resnet(self, name: str, output_scale_factor: float = 1.0) -> nn.Module:
        cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        return cls(self.out_channels, self.groups, self.eps, output_scale_factor, self.dtype, name=name)

    def transformer(self, name: str) -> nn.Module:
        cls = nn.remat(Transformer2DModel) if self.remat else Transformer2DModel
        return cls(self.heads, self.transformer_layers, self.groups, self.use_linear_projection,
                   self.upcast_attention, self.position_embedding, self.dtype, name=name)


class DownBlock2D(_Blocks):
    """`num_layers` resnets (each followed by a transformer if `cross_attention`), then a stride-2
    conv unless it is the last block. Returns the output and every intermediate for the skips."""

    cross_attention: bool = True
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array
                 ) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.cross_attention:
                x = self.transformer(f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype,
                             name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(_Blocks):
    """resnet -> transformer -> resnet at the lowest resolution."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnet("resnets_0", self.output_scale_factor)(x, temb)
        for i in range(self.num_layers):
            x = self.transformer(f"attentions_{i}")(x, context)
            x = self.resnet(f"resnets_{i + 1}", self.output_scale_factor)(x, temb)
        return x


class UpBlock2D(_Blocks):
    """Each layer concatenates one skip (channels last) before its resnet; then 2x upsampling to the
    next skip's size unless it is the last block."""

    cross_attention: bool = True
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, context: jax.Array,
                 upsample_size: tuple[int, int] | None = None) -> jax.Array:
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.cross_attention:
                x = self.transformer(f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


# ------------------------------------------------------------------------------------------- model


class UNet2DConditionModel(nn.Module):
    """The conditional UNet: (noisy sample NHWC, timesteps, text states) -> prediction NHWC.

    Attributes:
      config: the architecture.
      dtype: compute dtype (params stay float32); norms and softmax run in float32 regardless.
      remat: rematerialise resnet and transformer blocks in the backward pass (same numbers, less
        activation memory when differentiating w.r.t. `encoder_hidden_states`).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float | int,
                 encoder_hidden_states: jax.Array) -> jax.Array:
        """Args:
          sample: [B, H, W, in_channels] (NHWC).
          timesteps: a scalar or [B], int or float.
          encoder_hidden_states: [B, L, cross_attention_dim].
        Returns:
          [B, H, W, out_channels] in `dtype`.
        """
        cfg = self.config
        n = len(cfg.block_out_channels)
        layers = cfg.layers_per_block_list
        heads = cfg.heads_per_block
        tlayers = cfg.transformer_layers_per_block_list
        context = encoder_hidden_states.astype(self.dtype)
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                      use_linear_projection=cfg.use_linear_projection,
                      upcast_attention=cfg.upcast_attention,
                      position_embedding=cfg.attention_position_embedding, remat=self.remat,
                      dtype=self.dtype)

        # time
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                   freq_shift=cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_embed_dim, self.dtype, name="time_embedding")(t_emb)
        if cfg.addition_embed_type == "text":
            temb = temb + TextTimeEmbedding(cfg.time_embed_dim, cfg.addition_embed_type_num_heads,
                                            self.dtype, name="add_embedding")(context)

        # down
        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, self.dtype, name="conv_in")(x)
        skips = [x]
        for i, kind in enumerate(cfg.down_block_types):
            x, s = DownBlock2D(
                cfg.block_out_channels[i], layers[i], heads=heads[i], transformer_layers=tlayers[i],
                cross_attention=kind == "CrossAttnDownBlock2D", add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding, name=f"down_blocks_{i}", **common,
            )(x, temb, context)
            skips += s

        # mid
        if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
            x = UNetMidBlock2DCrossAttn(
                cfg.block_out_channels[-1], 1, heads=heads[-1], transformer_layers=tlayers[-1],
                output_scale_factor=cfg.mid_block_scale_factor, name="mid_block", **common,
            )(x, temb, context)

        # up
        for i, kind in enumerate(cfg.up_block_types):
            r = n - 1 - i  # the matching down block
            num = layers[r] + 1
            block_skips, skips = skips[-num:], skips[:-num]
            last = i == n - 1
            x = UpBlock2D(
                cfg.block_out_channels[r], num, heads=heads[r], transformer_layers=tlayers[r],
                cross_attention=kind == "CrossAttnUpBlock2D", add_upsample=not last,
                name=f"up_blocks_{i}", **common,
            )(x, block_skips, temb, context, None if last else tuple(skips[-1].shape[1:3]))

        # out
        x = nn.silu(group_norm(x, cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out"))
        return conv(cfg.out_channels, cfg.conv_out_kernel, self.dtype, name="conv_out")(x)


def dummy_inputs(config: UNetConfig, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sample, timesteps, encoder_hidden_states) of the right shapes for `init` / `jax.eval_shape`.

    Spatial size is `sample_size` (or 8 if unset); the text length is 77 as in CLIP.
    """
    size = config.sample_size or 8
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (
        jnp.zeros((batch, h, w, config.in_channels), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, 77, config.cross_attention_dim), jnp.float32),
    )
