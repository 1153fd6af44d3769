"""Hand-written backward passes for the UNet's GroupNorm, LayerNorm and GEGLU activation.

Why: De-Diffusion differentiates through the frozen UNet at every step (the gradient reaches the
text states), so the UNet's backward is half the step. Autodiff of these three ops keeps their
intermediates (centred inputs, inverse deviations broadcast to every element, erf terms) as
residuals, which the forward writes out and the backward reads back. Each function here keeps only
its input, plus two statistics per row or group for the norms, and recomputes the rest in the
backward: fewer full-size arrays in memory, fewer passes over them. On the 2-core CPU this took the
SD2-shaped UNet's forward + text gradient down by several percent (bench/README.md, "Custom backward
passes"); the memory saved holds on every backend. Values are the same as before: the forwards are
the formulas the modules computed, and tests/test_custom_grads.py checks every gradient against
autodiff of those formulas.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_SQRT_HALF = np.float32(math.sqrt(0.5))
_INV_SQRT_2PI = np.float32(1.0 / math.sqrt(2.0 * math.pi))


# ------------------------------------------------------------------------------------------ GroupNorm


def _group_stats(x: jax.Array, groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """Per-channel copies of each group's mean and 1 / std, [B, 1, C], for x of [B, L, C].

    The spatial axis is summed first, with the channels contiguous, then the [B, C] sums folded into
    groups (XLA:CPU runs that faster than a reduction over two non-adjacent axes). Two-pass variance.
    """
    per_group = x.shape[-1] // groups

    def group_mean(t: jax.Array) -> jax.Array:
        return _spread(t.sum(axis=1), groups) / (x.shape[1] * per_group)

    mean = group_mean(x)
    return mean, jax.lax.rsqrt(group_mean(jnp.square(x - mean)) + eps)


def _spread(sums: jax.Array, groups: int) -> jax.Array:
    """[B, C] per-channel sums -> [B, 1, C], each channel holding its group's total."""
    per_group = sums.shape[-1] // groups
    totals = sums.reshape(sums.shape[0], groups, per_group).sum(axis=-1)
    return jnp.repeat(totals, per_group, axis=-1)[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float) -> jax.Array:
    """torch's GroupNorm on x of [B, L, C] (float32), with its per-channel affine."""
    mean, inv_std = _group_stats(x, groups, eps)
    return (x - mean) * (inv_std * scale) + bias


def _group_norm_fwd(x, scale, bias, groups, eps):
    mean, inv_std = _group_stats(x, groups, eps)
    return (x - mean) * (inv_std * scale) + bias, (x, scale, mean, inv_std)


def _group_norm_bwd(groups, eps, residuals, dy):
    """dx = inv_std * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * scale, means over each group.

    The two group means come from per-channel sums of dy and dy * (x - mean), both taken in one pass
    over dy and x (scale and inv_std are constant along the summed axis, so they are applied to the
    [B, C] sums), and dx in a second: 2% off the SD2-shaped UNet's text gradient against summing
    g and g * x_hat (bench/README.md, "GroupNorm's backward")."""
    x, scale, mean, inv_std = residuals
    count = x.shape[1] * (x.shape[-1] // groups)
    centred = x - mean
    mean_g = _spread(dy.sum(axis=1) * scale, groups) / count
    mean_g_x_hat = _spread((dy * centred).sum(axis=1) * scale, groups) * inv_std / count
    dx = inv_std * (dy * scale - mean_g - centred * (inv_std * mean_g_x_hat))
    return dx, (dy * centred * inv_std).sum(axis=(0, 1)), dy.sum(axis=(0, 1))


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


# ------------------------------------------------------------------------------------------ LayerNorm


def _layer_stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    mean = x.mean(axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(jnp.square(x - mean).mean(axis=-1, keepdims=True) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis (two-pass variance, as flax's `use_fast_variance=False`)."""
    mean, inv_std = _layer_stats(x, eps)
    return (x - mean) * (inv_std * scale) + bias


def _layer_norm_fwd(x, scale, bias, eps):
    mean, inv_std = _layer_stats(x, eps)
    return (x - mean) * (inv_std * scale) + bias, (x, scale, mean, inv_std)


def _layer_norm_bwd(eps, residuals, dy):
    x, scale, mean, inv_std = residuals
    x_hat = (x - mean) * inv_std
    g = dy * scale
    dx = inv_std * (g - g.mean(axis=-1, keepdims=True) - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
    rows = tuple(range(x.ndim - 1))
    return dx, (dy * x_hat).sum(axis=rows), dy.sum(axis=rows)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# -------------------------------------------------------------------------------------------- GEGLU


def exact_gelu(x: jax.Array) -> jax.Array:
    """x * Phi(x) through erf, as torch computes it. jax.nn.gelu(approximate=False) goes through erfc,
    which XLA:CPU evaluates about 2.5x slower (bench/README.md, "Cores as devices, and GELU through erf"); the two
    agree within 1e-6 over [-12, 12] in float32. Computed in float32 whatever x's dtype (as torch does
    for bfloat16): in bfloat16, 1 + erf(x) cancels to 0 below x = -3."""
    x32 = x.astype(jnp.float32)
    return (x32 * 0.5 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))).astype(x.dtype)


@jax.custom_vjp
def geglu(projected: jax.Array) -> jax.Array:
    """GEGLU's activation: the last axis split into value and gate halves, value * gelu(gate)."""
    value, gate = jnp.split(projected, 2, axis=-1)
    return value * exact_gelu(gate)


def _geglu_fwd(projected):
    return geglu(projected), projected


def _geglu_bwd(projected, d_out):
    value, gate = jnp.split(projected, 2, axis=-1)
    gate32 = gate.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(gate32 * _SQRT_HALF))
    gelu_slope = cdf + gate32 * jnp.exp(-0.5 * jnp.square(gate32)) * _INV_SQRT_2PI
    d_value = d_out * (gate32 * cdf).astype(gate.dtype)
    d_gate = (d_out.astype(jnp.float32) * value.astype(jnp.float32) * gelu_slope).astype(gate.dtype)
    return (jnp.concatenate([d_value, d_gate], axis=-1),)


geglu.defvjp(_geglu_fwd, _geglu_bwd)


# ---------------------------------------------------------------------------------------- convolution
#
# The input gradient of a convolution is a convolution of the output's cotangent with the kernel
# reversed in space and with its input and output channels swapped. XLA makes that copy of every
# kernel inside every call (on CPU one `transpose_copy_fusion` per kernel, about 3-4% of the
# SD2-shaped UNet's gradient, bench/README.md). The decoder is frozen, so a caller can make the copies
# once (`flip_for_input_gradient`) and pass them in; `conv2d` then uses them in its backward.

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv2d_plain(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """flax's `nn.Conv` without bias: NHWC input, HWIO kernel, explicit padding."""
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def flip_for_input_gradient(kernel: jax.Array) -> jax.Array:
    """[kh, kw, in, out] -> [kh, kw, out, in] reversed in space: the kernel of the input gradient."""
    return jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))


def _input_gradient_padding(size_in: int, size_out: int, k: int, stride: int,
                            pad: tuple[int, int]) -> tuple[int, int]:
    """Padding of the stride-dilated cotangent so that the flipped kernel gives back size_in."""
    before = k - 1 - pad[0]
    return before, size_in + k - 1 - ((size_out - 1) * stride + 1) - before


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv2d(x: jax.Array, kernel: jax.Array, flipped: jax.Array, strides: tuple[int, int],
           padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """`conv2d_plain` whose input gradient uses `flipped` (= flip_for_input_gradient(kernel), made
    once by the caller) instead of flipping the kernel inside every call. Gradient w.r.t. `flipped`:
    zero (it stands for the kernel, whose gradient is the kernel's)."""
    return conv2d_plain(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, flipped, strides, padding):
    return conv2d_plain(x, kernel, strides, padding), (x, kernel, flipped)


def _conv2d_bwd(strides, padding, residuals, dy):
    x, kernel, flipped = residuals
    pads = tuple(_input_gradient_padding(x.shape[1 + i], dy.shape[1 + i], kernel.shape[i], strides[i],
                                         padding[i]) for i in range(2))
    dx = jax.lax.conv_general_dilated(dy, flipped, (1, 1), pads, lhs_dilation=strides,
                                      dimension_numbers=_NHWC)
    _, kernel_vjp = jax.vjp(lambda k: conv2d_plain(x, k, strides, padding), kernel)
    return dx.astype(x.dtype), kernel_vjp(dy)[0], jnp.zeros_like(flipped)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
