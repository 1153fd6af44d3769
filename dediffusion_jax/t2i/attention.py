"""Scaled dot-product attention shared by the UNet, the CLIP text tower (and so the ViT) and the VAE.

Why a function of its own: on XLA:CPU the plain formulation is memory-bound. It materialises the
[B, heads, Lq, Lk] logits, a broadcast of the scale, the softmax's exponentials and their quotient,
each several times the size of the caches, and autodiff keeps them all for the backward pass. On CPU
this module therefore loops over the batch (`jax.lax.map`) with a checkpointed body, so each
iteration's logits stay in cache and the backward recomputes them per example (as flash attention
does per block); it also divides the [.., Lq, D] output by the softmax's row sums instead of the
[.., Lq, Lk] exponentials. What that buys on the world UNet and an SD2-shaped one is measured in
bench/README.md ("Attention loop and GroupNorm"). Other backends keep the plain formulation, which
their compilers fuse (and where a loop over the batch would serialise work).

Numerics are the same up to float rounding (max |diff| ~1e-6 in float32): logits and softmax in
float32, the probabilities cast to the value dtype before the second matmul, as before.

`DEDIFFUSION_ATTENTION=plain|loop` overrides the choice (for benchmarks and the parity test).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

#: The logits of one call, in bytes, above which the CPU path loops (smaller ones fit in cache anyway).
LOOP_ABOVE_BYTES = 8 << 20
IMPLEMENTATIONS = ("auto", "plain", "loop")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                          *, scale: float, implementation: str | None = None) -> jax.Array:
    """softmax(q.k * scale) v over heads-first arrays.

    q: [B, H, Lq, D]; k, v: [B, H, Lk, D]; mask: boolean, broadcastable to [B, H, Lq, Lk], True =
    attend. Returns [B, H, Lq, D] in v's dtype. `implementation`: "plain", "loop" or "auto"/None
    (the environment's DEDIFFUSION_ATTENTION, else "loop" on CPU for large logits).
    """
    b, h, lq, _ = q.shape
    samples = _samples_per_iteration(b)
    if _choose(implementation, b * h * lq * k.shape[-2] * 4, samples, b) == "plain":
        return _plain(q, k, v, mask, scale)
    return _loop(q, k, v, mask, scale, samples)


def _choose(implementation: str | None, logits_bytes: int, samples: int, batch: int) -> str:
    choice = implementation or os.environ.get("DEDIFFUSION_ATTENTION", "auto")
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {choice!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    if choice == "auto":
        cpu = jax.default_backend() == "cpu"
        choice = "loop" if cpu and logits_bytes > LOOP_ABOVE_BYTES and samples < batch else "plain"
    return choice


def _samples_per_iteration(batch: int) -> int:
    """One example per iteration and device: with the batch sharded over n devices in n contiguous
    blocks, [B] -> [n, B/n] keeps the sharding on the first axis and the loop runs over the second."""
    n = jax.device_count()
    return n if batch % n == 0 else batch


def _plain(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


def _normalised_late(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                     scale: float) -> jax.Array:
    """The softmax's division moved after the second matmul (the same value; the max shift carries
    no gradient, as it cancels)."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    exps = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", exps.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / exps.sum(axis=-1, keepdims=True)).astype(v.dtype)


def _loop(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
          samples: int) -> jax.Array:
    b = q.shape[0]
    steps = b // samples

    def split(t: jax.Array) -> jax.Array:  # [B, ...] -> [B / samples, samples, ...]
        return jnp.swapaxes(t.reshape(samples, steps, *t.shape[1:]), 0, 1)

    per_example_mask = mask is not None and mask.shape[0] == b
    xs = (split(q), split(k), split(v), split(mask) if per_example_mask else None)
    shared_mask = None if per_example_mask else mask

    @jax.checkpoint  # the backward recomputes each example's logits instead of stacking them all
    def body(x: tuple) -> jax.Array:
        qi, ki, vi, mi = x
        return _normalised_late(qi, ki, vi, mi if per_example_mask else shared_mask, scale)

    out = jax.lax.map(body, xs)
    return jnp.swapaxes(out, 0, 1).reshape(b, *out.shape[2:])
