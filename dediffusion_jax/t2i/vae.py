"""AutoencoderKL (Stable Diffusion's latent VAE) in Flax linen, loading diffusers-format weights.

Why: a latent text-to-image decoder works on VAE latents, so De-Diffusion needs the VAE's encoder
(to make the clean x_0 of the training loss, usually precomputed) and decoder (to turn sampled latents
into pixels for evaluation). diffusers no longer ships a Flax VAE, so this is the project's own port.

Layout: every tensor here is **NHWC** (images `[B, H, W, C]`, latents `[B, H/f, W/f, latent_channels]`
with `f = 2 ** (len(block_out_channels) - 1)`), the layout XLA prefers; diffusers' torch model is
NCHW, so transpose at the boundary (`x.transpose(0, 2, 3, 1)`). Images are in [-1, 1].

Param paths mirror diffusers' state-dict keys (`encoder/down_blocks_0/resnets_0/conv1/kernel` is
`encoder.down_blocks.0.resnets.0.conv1.weight`), so `convert.torch_to_flax(state, abstract,
ignore=TORCH_IGNORE, aliases=TORCH_ALIASES)` and `convert.flax_to_torch` need no VAE-specific code;
only `squeeze_legacy_attention` is needed for the oldest checkpoints (see there).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dediffusion_jax.t2i.attention import dot_product_attention

SUPPORTED_DOWN_BLOCKS = ("DownEncoderBlock2D",)
SUPPORTED_UP_BLOCKS = ("UpDecoderBlock2D",)
SUPPORTED_ACTIVATIONS = ("silu", "swish")  # the same function; the port hard-codes nn.silu

# Older diffusers checkpoints (before the attention refactor) named the VAE mid-block attention
# `query/key/value/proj_attn`; diffusers itself renames them on load (`_fix_state_dict_keys_on_load`).
TORCH_ALIASES: dict[str, str] = {
    r"(attentions\.\d+)\.query\.": r"\1.to_q.",
    r"(attentions\.\d+)\.key\.": r"\1.to_k.",
    r"(attentions\.\d+)\.value\.": r"\1.to_v.",
    r"(attentions\.\d+)\.proj_attn\.": r"\1.to_out.0.",
}
# The VAE has no non-persistent buffers in its state dict; nothing to drop.
TORCH_IGNORE: tuple[str, ...] = ()

@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The subset of diffusers' AutoencoderKL config.json that defines the architecture and scaling.

    Defaults are diffusers' AutoencoderKL defaults, so a config.json missing a key means the same here.
    `latents_mean` / `latents_std` (SDXL-style per-channel normalisation) are used by
    `latents_from_images` when both are set.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config_json: Mapping[str, Any]) -> VAEConfig:
        """Reads a diffusers AutoencoderKL config.json; unknown keys are ignored, bad values raise."""
        values = {f.name: config_json.get(f.name, f.default) for f in dataclasses.fields(cls)}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            values[key] = tuple(values[key])
        for key in ("latents_mean", "latents_std"):
            if values[key] is not None:
                values[key] = tuple(float(v) for v in values[key])
        if isinstance(values["sample_size"], list):
            values["sample_size"] = tuple(values["sample_size"])
        for key, supported in (
            ("down_block_types", SUPPORTED_DOWN_BLOCKS),
            ("up_block_types", SUPPORTED_UP_BLOCKS),
        ):
            for block in values[key]:
                if block not in supported:
                    raise ValueError(
                        f"VAE config key {key!r}: block type {block!r} is not supported "
                        f"(supported: {', '.join(supported)})"
                    )
        n = len(values["block_out_channels"])
        for key in ("down_block_types", "up_block_types"):
            if len(values[key]) != n:
                raise ValueError(
                    f"VAE config key {key!r} has {len(values[key])} entries but "
                    f"block_out_channels has {n}"
                )
        if values["act_fn"] not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"VAE config key 'act_fn': {values['act_fn']!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        for c in values["block_out_channels"]:
            if c % values["norm_num_groups"]:
                raise ValueError(
                    f"VAE config key 'block_out_channels': {c} is not divisible by "
                    f"norm_num_groups={values['norm_num_groups']}"
                )
        if (values["latents_mean"] is None) != (values["latents_std"] is None):
            raise ValueError("VAE config keys 'latents_mean' and 'latents_std' must be set together")
        values["scaling_factor"] = float(values["scaling_factor"])
        if values["shift_factor"] is not None:
            values["shift_factor"] = float(values["shift_factor"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A config.json that `diffusers.AutoencoderKL.from_config` loads."""
        out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D without a time embedding (temb_channels=None), as in the VAE."""

    in_channels: int
    out_channels: int
    groups: int
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda c, k, name: nn.Conv(  # noqa: E731
            c, (k, k), padding=((k // 2, k // 2),) * 2, dtype=self.dtype, name=name
        )
        norm = lambda name: nn.GroupNorm(  # noqa: E731
            self.groups, epsilon=self.eps, use_fast_variance=False, dtype=self.dtype, name=name
        )
        h = conv(self.out_channels, 3, "conv1")(nn.silu(norm("norm1")(x)))
        h = conv(self.out_channels, 3, "conv2")(nn.silu(norm("norm2")(h)))
        if self.in_channels != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut")(x)
        return x + h


class VAEAttention(nn.Module):
    """diffusers Attention as built by UNetMidBlock2D for the VAE: one head, group norm, residual."""

    channels: int
    groups: int
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = nn.GroupNorm(
            self.groups, epsilon=self.eps, use_fast_variance=False, dtype=self.dtype, name="group_norm"
        )(x).reshape(b, hgt * wid, c)
        dense = lambda name: nn.Dense(self.channels, dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
        # One head; softmax in float32 (diffusers: upcast_softmax=True) so bf16 compute stays stable.
        h = dot_product_attention(q[:, None], k[:, None], v[:, None], scale=1 / math.sqrt(c))[:, 0]
        # `to_out` is a ModuleList [Linear, Dropout] in torch; the Linear is `to_out.0`.
        h = nn.Dense(self.channels, dtype=self.dtype, name="to_out_0")(h)
        return x + h.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
    """UNetMidBlock2D (one layer): resnet, [attention], resnet."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        res = lambda i: ResnetBlock2D(  # noqa: E731
            self.channels, self.channels, self.groups, dtype=self.dtype, name=f"resnets_{i}"
        )
        x = res(0)(x)
        if self.add_attention:
            x = VAEAttention(self.channels, self.groups, dtype=self.dtype, name="attentions_0")(x)
        return res(1)(x)


class _Conv(nn.Module):
    """A module holding one conv named `conv`, mirroring diffusers' Downsample2D / Upsample2D."""

    channels: int
    upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.upsample:  # nearest-neighbour x2, then 3x3 conv
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            padding = ((1, 1), (1, 1))
            strides = (1, 1)
        else:  # diffusers' VAE uses padding=0: pad right/bottom by one, then stride-2 conv
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            padding = "VALID"
            strides = (2, 2)
        return nn.Conv(
            self.channels, (3, 3), strides=strides, padding=padding, dtype=self.dtype, name="conv"
        )(x)


class DownEncoderBlock2D(nn.Module):
    """`layers_per_block` resnets, then (except in the last block) a stride-2 downsampler."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            c_in = self.in_channels if j == 0 else self.out_channels
            x = ResnetBlock2D(c_in, self.out_channels, self.groups, dtype=self.dtype,
                              name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = _Conv(self.out_channels, upsample=False, dtype=self.dtype,
                      name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`layers_per_block + 1` resnets, then (except in the last block) a x2 upsampler."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            c_in = self.in_channels if j == 0 else self.out_channels
            x = ResnetBlock2D(c_in, self.out_channels, self.groups, dtype=self.dtype,
                              name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = _Conv(self.out_channels, upsample=True, dtype=self.dtype, name="upsamplers_0")(x)
        return x


def _conv3(channels: int, dtype: Any, name: str) -> nn.Conv:
    return nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


def _norm_out(groups: int, dtype: Any) -> nn.GroupNorm:
    return nn.GroupNorm(groups, epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                        name="conv_norm_out")


class Encoder(nn.Module):
    """diffusers' VAE Encoder with double_z=True: image -> 2 * latent_channels moments."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        x = _conv3(chans[0], self.dtype, "conv_in")(x)
        for i, out_ch in enumerate(chans):
            in_ch = chans[max(i - 1, 0)]
            x = DownEncoderBlock2D(in_ch, out_ch, cfg.layers_per_block, groups,
                                   add_downsample=i < len(chans) - 1, dtype=self.dtype,
                                   name=f"down_blocks_{i}")(x)
        x = MidBlock(chans[-1], groups, cfg.mid_block_add_attention, dtype=self.dtype,
                     name="mid_block")(x)
        x = nn.silu(_norm_out(groups, self.dtype)(x))
        return _conv3(2 * cfg.latent_channels, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """diffusers' VAE Decoder (group norm, no spatial norm): latent -> image."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        rev, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        x = _conv3(rev[0], self.dtype, "conv_in")(z)
        x = MidBlock(rev[0], groups, cfg.mid_block_add_attention, dtype=self.dtype,
                     name="mid_block")(x)
        for i, out_ch in enumerate(rev):
            in_ch = rev[max(i - 1, 0)]
            x = UpDecoderBlock2D(in_ch, out_ch, cfg.layers_per_block + 1, groups,
                                 add_upsample=i < len(rev) - 1, dtype=self.dtype,
                                 name=f"up_blocks_{i}")(x)
        x = nn.silu(_norm_out(groups, self.dtype)(x))
        return _conv3(cfg.out_channels, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """Stable Diffusion's KL-regularised autoencoder; NHWC in and out.

    `encode(x) -> (mean, logvar)` of the diagonal Gaussian posterior (logvar clamped to [-30, 20]
    as diffusers does); `decode(z) -> x`. Neither applies `scaling_factor`: use
    `latents_from_images` / `images_from_latents` to move between pixels and diffusion latents.
    """

    config: VAEConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, dtype=self.dtype)
        self.decoder = Decoder(cfg, dtype=self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [B, H, W, in_channels] in [-1, 1] -> posterior (mean, logvar), unscaled latents."""
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, latent_channels] -> images [B, H, W, out_channels]."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstructs from the posterior mean; exists so `init` creates every parameter."""
        mean, _ = self.encode(x)
        return self.decode(mean)


def dummy_inputs(config: VAEConfig, batch: int = 1) -> tuple[jax.Array]:
    """Positional args for `AutoencoderKL(config).init(rng, *dummy_inputs(config))`."""
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return (jnp.zeros((batch, h, w, config.in_channels), jnp.float32),)


def _normalise(config: VAEConfig, latents: jax.Array) -> jax.Array:
    if config.latents_mean is not None:
        mean = jnp.asarray(config.latents_mean, latents.dtype)
        std = jnp.asarray(config.latents_std, latents.dtype)
        return (latents - mean) * config.scaling_factor / std
    if config.shift_factor is not None:
        latents = latents - config.shift_factor
    return latents * config.scaling_factor


def _denormalise(config: VAEConfig, latents: jax.Array) -> jax.Array:
    if config.latents_mean is not None:
        mean = jnp.asarray(config.latents_mean, latents.dtype)
        std = jnp.asarray(config.latents_std, latents.dtype)
        return latents * std / config.scaling_factor + mean
    latents = latents / config.scaling_factor
    if config.shift_factor is not None:
        latents = latents + config.shift_factor
    return latents


def latents_from_images(
    vae_params: Any,
    config: VAEConfig,
    images: jax.Array,
    rng: jax.Array | None = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Images [B, H, W, C] in [-1, 1] -> diffusion latents `(z - shift) * scaling_factor`.

    Why a helper: forgetting the scaling factor silently trains the UNet on latents ~5x too large.
    With `rng` the latent is a posterior sample (as diffusers' training scripts do), else the mean.
    With `latents_mean`/`latents_std` in the config, `(z - mean) * scaling_factor / std` (SDXL).
    """
    mean, logvar = AutoencoderKL(config, dtype=dtype).apply(
        {"params": vae_params}, images, method=AutoencoderKL.encode
    )
    return latents_from_posterior(config, mean, logvar, rng)


def latents_from_posterior(
    config: VAEConfig, mean: jax.Array, logvar: jax.Array, rng: jax.Array | None = None
) -> jax.Array:
    """The posterior (mean, logvar) of `AutoencoderKL.encode` -> diffusion latents, as
    `latents_from_images` makes them: a sample `mean + exp(logvar / 2) * eps` (eps drawn from `rng` in
    mean's dtype; the mean itself without `rng`), then shift and `scaling_factor`. Precomputed
    posteriors (`python -m dediffusion_jax.encode_latents`) go through here, so the same key gives the
    same latent as the encode in the step."""
    z = mean
    if rng is not None:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return _normalise(config, z)


def images_from_latents(
    vae_params: Any, config: VAEConfig, latents: jax.Array, dtype: Any = jnp.float32
) -> jax.Array:
    """Inverse of `latents_from_images`: diffusion latents -> images [B, H, W, C] (about [-1, 1])."""
    return AutoencoderKL(config, dtype=dtype).apply(
        {"params": vae_params}, _denormalise(config, latents), method=AutoencoderKL.decode
    )


_LEGACY_ATTN = re.compile(
    r"attentions\.\d+\.(query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\.weight$"
)


def squeeze_legacy_attention(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Squeezes 1x1-conv attention weights `[O, I, 1, 1]` to Linear `[O, I]`.

    Why: some converted LDM checkpoints kept the VAE attention projections as 1x1 convolutions.
    A key rename (TORCH_ALIASES) cannot change a shape, so apply this before `torch_to_flax`.
    """
    out = dict(state)
    for key, value in state.items():
        arr = np.asarray(value)
        if _LEGACY_ATTN.search(key) and arr.ndim == 4 and arr.shape[2:] == (1, 1):
            out[key] = arr[:, :, 0, 0]
    return out
