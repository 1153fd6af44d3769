"""Building blocks of the diffusers UNet2DConditionModel, in Flax linen, NHWC layout.

Why a separate file: the UNet file then reads as the architecture (which block goes where) while this
file holds the layers. Every submodule is named exactly like its torch counterpart (`norm1`, `conv1`,
`time_emb_proj`, `attn1/to_out_0`, `ff/net_0/proj`, ...), so `convert.torch_to_flax` maps a diffusers
state dict onto these modules with no model-specific table.

Numerics: params are float32; `dtype` is the compute dtype. Normalisations and the attention softmax
always run in float32 (bf16 statistics over a few thousand elements are too coarse), and
`upcast_attention` additionally computes the q.k logits in float32, as Stable Diffusion 2.x needs.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dediffusion_jax.t2i import custom_grads
from dediffusion_jax.t2i.attention import dot_product_attention

Dtype = Any


def group_norm(x: jax.Array, num_groups: int, eps: float, name: str) -> jax.Array:
    """GroupNorm computed in float32, returned in x's dtype. Params `<name>/scale`, `<name>/bias`.

    Must be called inside a compact method: the norm becomes a child of the calling module.
    """
    return GroupNorm(num_groups, eps, name=name)(x.astype(jnp.float32)).astype(x.dtype)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on channels-last arrays, with flax's parameter names (`scale`, `bias`).

    Why not `nn.GroupNorm`: it reduces [B, HW, groups, C/groups] over two non-adjacent axes, which
    XLA:CPU runs slowly. Here the spatial axis is summed first, with the channels contiguous, and the
    [B, C] sums are then folded into groups, which XLA:CPU runs faster (bench/README.md, "Attention
    loop and GroupNorm"); the backward is written by hand (`custom_grads.group_norm`). The variance is
    two-pass (mean of squared deviations), as flax's `use_fast_variance=False`.
    """

    num_groups: int
    epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        flat = x.reshape(x.shape[0], -1, channels)
        return custom_grads.group_norm(flat, scale, bias, self.num_groups, self.epsilon).reshape(x.shape)


class LayerNorm(nn.Module):
    """flax's LayerNorm (`use_fast_variance=False`, params `scale` and `bias`) with the backward of
    `custom_grads.layer_norm`."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return custom_grads.layer_norm(x, scale, bias, self.epsilon)


def layer_norm(x: jax.Array, name: str, eps: float = 1e-5) -> jax.Array:
    """LayerNorm computed in float32, returned in x's dtype (call inside a compact method)."""
    return LayerNorm(eps, name=name)(x.astype(jnp.float32)).astype(x.dtype)


# The Flax collection that may hold, for every convolution, its kernel already flipped for the input
# gradient (custom_grads.flip_for_input_gradient). Made once for a frozen decoder by
# `input_gradient_kernels`; when present, `Conv` uses it instead of flipping the kernel in every call.
INPUT_GRAD_KERNELS = "input_grad_kernels"


class Conv(nn.Module):
    """flax's `nn.Conv` (params `kernel` [k, k, in, out] and `bias`, the same initialisers and
    values) whose input gradient reads the pre-flipped kernel of the `input_grad_kernels` collection
    when the caller passes one."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        strides = (self.strides, self.strides)
        if self.has_variable(INPUT_GRAD_KERNELS, "kernel"):
            flipped = self.get_variable(INPUT_GRAD_KERNELS, "kernel").astype(kernel.dtype)
            y = custom_grads.conv2d(x, kernel, flipped, strides, self.padding)
        else:
            y = custom_grads.conv2d_plain(x, kernel, strides, self.padding)
        return y + bias.reshape(1, 1, 1, -1)


def input_gradient_kernels(params: Any) -> dict[str, Any]:
    """The `input_grad_kernels` collection for a (frozen) param tree: every 4-D `kernel` flipped once.

    Pass it beside the params, `apply({"params": p, INPUT_GRAD_KERNELS: input_gradient_kernels(p)},
    ...)`: the same values, and a gradient through the model that skips one kernel copy per
    convolution per call. It costs a second copy of the convolution kernels in memory."""
    out = {}
    for name, value in params.items():
        if hasattr(value, "items"):
            sub = input_gradient_kernels(value)
            if sub:
                out[name] = sub
        elif name == "kernel" and getattr(value, "ndim", 0) == 4:
            out[name] = custom_grads.flip_for_input_gradient(value)
    return out


def conv(features: int, kernel: int, dtype: Dtype, *, stride: int = 1, padding: Any = None,
         name: str | None = None) -> Conv:
    """A torch-style Conv2d: symmetric padding (kernel - 1) // 2 unless given explicitly."""
    if padding is None:
        p = (kernel - 1) // 2
        padding = ((p, p), (p, p))
    return Conv(features, kernel, stride, tuple(map(tuple, padding)), dtype=dtype, name=name)


def dense(features: int, dtype: Dtype, *, use_bias: bool = True, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


# ----------------------------------------------------------------------------------------------- time


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' `get_timestep_embedding` (sinusoidal, float32): [B] -> [B, dim]."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding; torch names `linear_1` / `linear_2` are literal."""

    time_embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_emb: jax.Array) -> jax.Array:
        h = dense(self.time_embed_dim, self.dtype, name="linear_1")(t_emb.astype(self.dtype))
        h = nn.silu(h)
        return dense(self.time_embed_dim, self.dtype, name="linear_2")(h)


class AttentionPooling(nn.Module):
    """diffusers' `AttentionPooling` (from DeepFloyd IF): one query, the mean token plus a learned
    offset, attends over [query; tokens]. Padding tokens are not masked, as in diffusers."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        dim_head = d // self.heads
        pos = self.param("positional_embedding",
                         lambda k: jax.random.normal(k, (1, d), jnp.float32) / math.sqrt(d))
        cls = x.mean(axis=1, keepdims=True) + pos.astype(x.dtype)
        tokens = jnp.concatenate([cls, x], axis=1)
        q = dense(d, self.dtype, name="q_proj")(cls).reshape(b, 1, self.heads, dim_head)
        k = dense(d, self.dtype, name="k_proj")(tokens).reshape(b, n + 1, self.heads, dim_head)
        v = dense(d, self.dtype, name="v_proj")(tokens).reshape(b, n + 1, self.heads, dim_head)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(dim_head)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, d)


class TextTimeEmbedding(nn.Module):
    """diffusers' `TextTimeEmbedding` (`addition_embed_type="text"`): the text states pooled into one
    vector that is added to the time embedding, so every ResBlock sees a summary of the prompt."""

    time_embed_dim: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text_states: jax.Array) -> jax.Array:
        h = layer_norm(text_states.astype(self.dtype), "norm1")
        h = AttentionPooling(self.heads, self.dtype, name="pool")(h)
        h = dense(self.time_embed_dim, self.dtype, name="proj")(h)
        return layer_norm(h, "norm2")


# -------------------------------------------------------------------------------------------- resnet


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the time embedding added between; 1x1 shortcut if C changes."""

    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = group_norm(x.astype(self.dtype), self.groups, self.eps, "norm1")
        h = conv(self.out_channels, 3, self.dtype, name="conv1")(nn.silu(h))
        t = dense(self.out_channels, self.dtype, name="time_emb_proj")(nn.silu(temb.astype(self.dtype)))
        h = h + t[:, None, None, :]
        h = group_norm(h, self.groups, self.eps, "norm2")
        h = conv(self.out_channels, 3, self.dtype, name="conv2")(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, name="conv_shortcut")(x)
        return (x.astype(self.dtype) + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. diffusers' padding=0 means pad right/bottom by one (asymmetric)."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        pad = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
        return conv(self.out_channels, 3, self.dtype, stride=2, padding=pad, name="conv")(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch `F.interpolate(mode="nearest", size=...)` on NHWC: source index floor(dst * in / out)."""
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        if n == out:
            continue
        if out == 2 * n:
            x = jnp.repeat(x, 2, axis=axis)
        else:
            idx = np.minimum(np.floor(np.arange(out) * (n / out)).astype(np.int32), n - 1)
            x = jnp.take(x, idx, axis=axis)
    return x


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (2x, or to the skip connection's size) then a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        if output_size is None:
            output_size = (2 * x.shape[1], 2 * x.shape[2])
        x = nearest_resize(x, tuple(output_size))
        return conv(self.out_channels, 3, self.dtype, name="conv")(x)


# ----------------------------------------------------------------------------------------- attention


def heads_first(t: jax.Array, heads: int) -> jax.Array:
    """[B, L, heads * D] -> [B, heads, L, D].

    Both attention matmuls then batch over leading dimensions. With the heads in the middle
    ("bqhd,bkhd->bhqk") XLA:CPU ran the world UNet's first-level self-attention about 3x slower, and
    the whole world UNet's forward at batch 32 took 291 ms instead of 149 (bench/README.md,
    "Attention layout").
    """
    return jnp.swapaxes(t.reshape(*t.shape[:-1], heads, t.shape[-1] // heads), -2, -3)


def tokens_first(t: jax.Array) -> jax.Array:
    """[B, heads, L, D] -> [B, L, heads * D] (the inverse of `heads_first`)."""
    t = jnp.swapaxes(t, -2, -3)
    return t.reshape(*t.shape[:-2], t.shape[-2] * t.shape[-1])


class Attention(nn.Module):
    """Multi-head attention with diffusers' names (to_q/to_k/to_v without bias, to_out_0).

    Softmax in float32; with `upcast` the logits are float32 too (q and k are cast before q.k).
    """

    heads: int
    dim_head: int
    upcast: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context.astype(self.dtype)
        inner = self.heads * self.dim_head
        q = dense(inner, self.dtype, use_bias=False, name="to_q")(x)
        k = dense(inner, self.dtype, use_bias=False, name="to_k")(context)
        v = dense(inner, self.dtype, use_bias=False, name="to_v")(context)
        q, k, v = (heads_first(t, self.heads) for t in (q, k, v))
        if self.upcast:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        out = tokens_first(dot_product_attention(q, k, v, scale=self.dim_head ** -0.5))
        return dense(x.shape[-1], self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """`proj` to 2x the hidden size, split into value and gate; value * gelu(gate) (exact gelu, the
    backward of `custom_grads.geglu`)."""

    dim_out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return custom_grads.geglu(dense(2 * self.dim_out, self.dtype, name="proj")(x))


class FeedForward(nn.Module):
    """`net_0` (GEGLU, 4x) -> dropout (`net_1`, identity at inference) -> `net_2` linear."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, self.dtype, name="net_0")(x)
        return dense(dim, self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention (`attn1`), cross-attention on the text (`attn2`), GEGLU MLP (`ff`)."""

    heads: int
    dim_head: int
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        attn = lambda name: Attention(  # noqa: E731
            self.heads, self.dim_head, self.upcast_attention, self.dtype, name=name)
        x = x + attn("attn1")(layer_norm(x, "norm1"))
        x = x + attn("attn2")(layer_norm(x, "norm2"), context)
        x = x + FeedForward(dtype=self.dtype, name="ff")(layer_norm(x, "norm3"))
        return x


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over the H*W tokens -> proj_out, plus residual.

    `use_linear_projection` picks a Linear (SD 2.x) or a 1x1 conv (SD 1.x) for proj_in/out: the same
    maths, different checkpoint shapes. Head dim is channels // heads, as in diffusers.
    """

    heads: int
    num_layers: int = 1
    norm_groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    position_embedding: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        dim_head = c // self.heads
        inner = self.heads * dim_head
        residual = x
        y = group_norm(x.astype(self.dtype), self.norm_groups, 1e-6, "norm")
        if self.use_linear_projection:
            proj_in = dense(inner, self.dtype, name="proj_in")
            proj_out = dense(c, self.dtype, name="proj_out")
        else:
            proj_in = conv(inner, 1, self.dtype, name="proj_in")
            proj_out = conv(c, 1, self.dtype, name="proj_out")
        y = proj_in(y).reshape(b, h * w, inner)
        if self.position_embedding:  # project extension (see UNetConfig.attention_position_embedding)
            pos = self.param("pos_embed", nn.initializers.zeros, (h * w, inner), jnp.float32)
            y = y + pos.astype(y.dtype)
        for i in range(self.num_layers):
            y = BasicTransformerBlock(self.heads, dim_head, self.upcast_attention, self.dtype,
                                      name=f"transformer_blocks_{i}")(y, context)
        y = proj_out(y.reshape(b, h, w, inner))
        return y + residual.astype(self.dtype)
