"""Scaled dot-product attention shared by the UNet, the CLIP text tower (and so the ViT) and the VAE.

Why a function of its own: on XLA:CPU the plain formulation is memory-bound. It materialises the
[B, heads, Lq, Lk] logits, a broadcast of the scale, the softmax's exponentials and their quotient,
each several times the size of the caches, and autodiff keeps them all for the backward pass. On CPU
this module therefore loops over the batch (`jax.lax.map`), so each iteration's logits stay in
cache, and divides the [.., Lq, D] output by the softmax's row sums instead of the [.., Lq, Lk]
exponentials. Without a mask the loop has its own backward (`_flash`, as flash attention's): the
forward keeps only the output and each row's log-sum-exp, the backward recomputes one example's
probabilities at a time and computes dk and dv transposed, so that no matmul contracts the major
axis of a [Lq, Lk] left operand (XLA:CPU runs those about 3x slower). With a mask the
body is checkpointed instead (the backward recomputes each example's logits; autodiff does the rest).
What each buys on the world UNet and an SD2-shaped one is measured in bench/README.md ("Attention loop
and GroupNorm", "Custom backward passes"). Other backends keep the plain formulation, which their
compilers fuse (and where a loop over the batch would serialise work).

Numerics are the same up to float rounding (max |diff| ~1e-6 in float32): logits and softmax in
float32, the probabilities cast to the value dtype before the second matmul, as before.

`DEDIFFUSION_ATTENTION=plain|loop` overrides the choice (for benchmarks and the parity test).
"""

from __future__ import annotations

import functools
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


def _split(t: jax.Array, samples: int) -> jax.Array:
    """[B, ...] -> [B / samples, samples, ...]: the loop's steps first, the batch's sharded blocks kept."""
    return jnp.swapaxes(t.reshape(samples, t.shape[0] // samples, *t.shape[1:]), 0, 1)


def _merge(t: jax.Array) -> jax.Array:
    """The inverse of `_split`."""
    return jnp.swapaxes(t, 0, 1).reshape(-1, *t.shape[2:])


def _flash_forward(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """One step's output and its rows' log-sum-exp (float32), for the backward to rebuild the softmax."""
    logits = jnp.einsum("...qd,...kd->...qk", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)
    row_max = logits.max(axis=-1, keepdims=True)
    exps = jnp.exp(logits - row_max)
    sums = exps.sum(axis=-1, keepdims=True)
    out = jnp.einsum("...qk,...kd->...qd", exps.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / sums).astype(v.dtype), (row_max + jnp.log(sums))[..., 0]


def _flash_backward_step(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array,
                         d_out: jax.Array, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dq, dk, dv of one step, from its probabilities recomputed in float32."""
    q_scaled = q * jnp.asarray(scale, q.dtype)
    logits = jnp.einsum("...qd,...kd->...qk", q_scaled, k, preferred_element_type=jnp.float32)
    probs = jnp.exp(logits - lse[..., None])
    d_probs = jnp.einsum("...qd,...kd->...qk", d_out, v, preferred_element_type=jnp.float32)
    row_dot = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(axis=-1, keepdims=True)
    d_logits = probs * (d_probs - row_dot)
    dq = jnp.einsum("...qk,...kd->...qd", d_logits, k, preferred_element_type=jnp.float32) * scale
    # dk and dv contract the queries, the major axis of the [Lq, Lk] arrays, which XLA:CPU runs about
    # 3x slower as a matmul's left operand. So they are computed transposed, dk^T = q^T d_logits and
    # dv^T = dO^T probs, with the [Lq, Lk] arrays as the right operand, where that axis belongs; only
    # the small [Lq, D] operands are transposed (the barrier keeps XLA from folding it back).
    q_t, d_out_t = jax.lax.optimization_barrier((jnp.swapaxes(q_scaled, -1, -2), jnp.swapaxes(d_out, -1, -2)))
    dk = jnp.swapaxes(jnp.einsum("...dq,...qk->...dk", q_t, d_logits, preferred_element_type=jnp.float32), -1, -2)
    dv = jnp.swapaxes(jnp.einsum("...dq,...qk->...dk", d_out_t, probs.astype(v.dtype),
                                 preferred_element_type=jnp.float32), -1, -2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, samples: int) -> jax.Array:
    """The loop without a mask: `samples` examples per iteration, flash attention's backward."""
    return _flash_fwd(q, k, v, scale, samples)[0]


def _flash_fwd(q, k, v, scale, samples):
    out, lse = jax.lax.map(lambda x: _flash_forward(*x, scale), tuple(_split(t, samples) for t in (q, k, v)))
    out = _merge(out)
    return out, (q, k, v, out, _merge(lse))


def _flash_bwd(scale, samples, residuals, d_out):
    steps = tuple(_split(t, samples) for t in (*residuals, d_out))
    return tuple(_merge(t) for t in jax.lax.map(lambda x: _flash_backward_step(*x, scale), steps))


_flash.defvjp(_flash_fwd, _flash_bwd)


def _loop(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
          samples: int) -> jax.Array:
    if mask is None:
        return _flash(q, k, v, scale, samples)
    per_example_mask = mask.shape[0] == q.shape[0]
    xs = (*(_split(t, samples) for t in (q, k, v)), _split(mask, samples) if per_example_mask else None)

    @jax.checkpoint  # the backward recomputes each example's logits instead of stacking them all
    def body(x: tuple) -> jax.Array:
        qi, ki, vi, mi = x
        return _normalised_late(qi, ki, vi, mi if per_example_mask else mask, scale)

    return _merge(jax.lax.map(body, xs))
