"""Text quantizer: vocabulary mask, vocabulary head, Gumbel-softmax, temperature schedules, assembly.

The encoder's latent must stay text the frozen decoder understands, so the quantizer works over the
decoder tokenizer's own vocabulary (49,408 CLIP BPE entries for Stable Diffusion) and hands the text
encoder either soft one-hots [B, L, V] (multiplied by its token-embedding matrix) or, more cheaply,
token embeddings [B, L, D] formed here. Either way the gradient passes THROUGH the embedding matrix
(the paper's gradient path; a known trap): d loss / d probs = d loss / d embeds @ E^T.

Memory (why `soft_token_embeddings` / `fused_soft_token_embeddings` exist). The relaxed one-hot is the
largest activation of the model: N x V x 4 bytes = 14.8 MB per example at N = 75, V = 49,408. With the
plain `gumbel_softmax(...) @ E`, autodiff keeps that soft one-hot from the forward pass to the backward
pass, i.e. alive across the whole frozen decoder. `soft_token_embeddings` keeps no soft one-hot, only the
logits and the rng (the noise and the softmax are recomputed in the backward pass) -- but the logits are
just as large, so on its own it saves no bytes (measured below); it is the drop-in op that lets the
decoder take token_embeds. `fused_soft_token_embeddings` also recomputes the logits from the pooler
features and the head weights, chunk by chunk of query rows, so nothing of size [B, N, V] is kept or even
fully built: that is the one that removes the 14.8 MB/example. Its default chunking (`auto_rows_per_chunk`)
takes the fewest equal chunks, at least 2, whose [chunk, V] float32 temporaries fit
`quantizer.chunk_budget_mb` (64 MB: at most 80 rows at V = 49,408); each device chunks its own rows
(`batch_shards`). The measurements behind it: bench/README.md, `python -m bench.vocab_head`.
Measured with XLA's memory analysis on CPU: value_and_grad w.r.t. the head (kernel [128, V], bias) of a
mean-squared loss on the [B, N, 64] embeddings, B = 4, N = 75, V = 49,408, soft; per example
(`tests/test_quantizer.py::test_memory_report` prints them; 2026-12-06):
  formulation                      saved residuals   XLA temp (peak temporaries of the compiled step)
  plain gumbel_softmax @ E             14.88 MB          74.11 MB
  soft_token_embeddings (logits)       14.88 MB          74.11 MB
  fused (rows_per_chunk = 16)           0.06 MB           7.27 MB
  fused (default: 4 chunks of 75)       0.06 MB          18.70 MB
"Saved residuals" is what autodiff keeps from the forward to the backward pass (what stays alive while the
decoder runs); arguments (head 25.3 MB + E 12.6 MB) are the same for all. The fused op's temporaries are
those of its own loop, which runs before and after the decoder, not beside it: in a whole train step
16-row and 75-row chunks give the same peak (bench/README.md).
"""

from __future__ import annotations

import functools
import math
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dediffusion_jax import loop_flops
from dediffusion_jax.t2i.bpe import bytes_to_unicode

Array = jax.Array
# Finite instead of -inf: exp underflows to exactly 0 for any temperature <= ~1e7 and any Gumbel noise,
# while (x - max) stays finite, so neither forward nor backward produces NaN.
MASK_VALUE = -1e9


# --------------------------------------------------------------------------- vocabulary mask
@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of `bytes_to_unicode` (printable symbol -> byte)."""
    return {c: b for b, c in bytes_to_unicode().items()}


def decode_bpe_symbol(token: str) -> str | None:
    """Text of one CLIP BPE vocabulary entry: strip '</w>', undo the byte-level mapping.

    Returns None when the bytes are not complete UTF-8 (a fragment of a multi-byte character).
    """
    if token.endswith("</w>"):
        token = token[: -len("</w>")]
    table = _byte_decoder()
    if not all(ch in table for ch in token):
        return token  # not a byte-level symbol (e.g. an added token): use as is
    try:
        return bytes(table[ch] for ch in token).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _is_punctuation_text(text: str | None) -> bool:
    return bool(text) and all(unicodedata.category(ch)[0] in "PS" for ch in text)


def vocabulary_exclusion_mask(tokenizer: Any, exclude_punctuation: bool = True,
                              extra_excluded_tokens: Iterable[str | int] = (),
                              only_tokens: Iterable[str | int] = ()) -> np.ndarray:
    """Boolean [V] mask, True = the encoder may never emit this token.

    Always excluded: every special token (bos/eos/pad/unk and `tokenizer.all_special_ids`), since the
    assembly adds SOS/EOS/PAD itself. With `exclude_punctuation`: every entry whose text (after
    stripping '</w>' and undoing CLIP's byte-level symbols) is only punctuation/symbol characters
    (unicode categories P* and S*), the paper's "all punctuation" (~6% of CLIP's vocabulary).
    `extra_excluded_tokens`: ids, exact vocabulary entries ("dog</w>"), or other strings, which are
    tokenized and all their pieces excluded. `only_tokens` (ids or exact vocabulary entries), when
    given, excludes every other entry too (e.g. a small world's whole words without its BPE pieces).
    Works with any tokenizer offering `get_vocab()` and `len()` (transformers CLIPTokenizer, slow
    or fast).
    """
    vocab: dict[str, int] = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    mask = np.zeros(size, dtype=np.bool_)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            special.add(int(value))
    mask[sorted(special)] = True
    if exclude_punctuation:
        for token, idx in vocab.items():
            if _is_punctuation_text(decode_bpe_symbol(token)):
                mask[idx] = True
    for item in extra_excluded_tokens:
        if isinstance(item, (int, np.integer)):
            mask[int(item)] = True
        elif item in vocab:
            mask[vocab[item]] = True
        else:
            mask[tokenizer(item, add_special_tokens=False)["input_ids"]] = True
    only = list(only_tokens)
    if only:
        unknown = [t for t in only if not isinstance(t, (int, np.integer)) and t not in vocab]
        if unknown:
            raise ValueError(f"only_tokens not in the vocabulary: {unknown[:5]}")
        keep = np.zeros_like(mask)
        keep[[int(t) if isinstance(t, (int, np.integer)) else vocab[t] for t in only]] = True
        mask |= ~keep
    return mask


def excluded_ids(mask: np.ndarray) -> tuple[int, ...]:
    """Hashable form of a mask, for a linen module attribute."""
    return tuple(int(i) for i in np.flatnonzero(np.asarray(mask)))


def _mask_array(vocab_size: int, ids: Sequence[int]) -> np.ndarray:
    mask = np.zeros(vocab_size, dtype=np.bool_)
    if len(ids):
        mask[np.asarray(ids, dtype=np.int64)] = True
    return mask


def apply_mask(logits: Array, mask: Array | np.ndarray) -> Array:
    """float32 logits with excluded entries set to MASK_VALUE (exactly zero probability, zero grad)."""
    # An additive [V] offset rather than jnp.where: its derivative is the identity, so autodiff keeps no
    # broadcast [B, N, V] mask for the backward pass. |logits| << 1e9, so masked entries still get
    # exactly zero probability and, through the softmax, exactly zero gradient.
    offset = jnp.where(jnp.asarray(mask), jnp.float32(MASK_VALUE), jnp.float32(0.0))
    return logits.astype(jnp.float32) + offset


# --------------------------------------------------------------------------- vocabulary head
class VocabularyHead(nn.Module):
    """Linear layer from query features to masked float32 logits over the decoder's vocabulary."""

    vocab_size: int
    excluded_ids: tuple[int, ...] = ()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Array) -> Array:
        logits = nn.Dense(self.vocab_size, dtype=self.dtype, name="dense")(features)
        return apply_mask(logits, _mask_array(self.vocab_size, self.excluded_ids))


# --------------------------------------------------------------------------- Gumbel-softmax
def gumbel_noise(rng: Array, shape: Sequence[int]) -> Array:
    """float32 Gumbel(0, 1) noise, drawn row by row (fold_in(rng, row)) over the last axis.

    Row-wise drawing is what lets the fused custom VJP regenerate the same noise for a chunk of rows
    without materialising all of it; every Gumbel path here uses this function so they agree bit for bit.
    """
    *lead, vocab = shape
    rows = math.prod(lead)
    draw = jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(rng, i), (vocab,), jnp.float32))
    return draw(jnp.arange(rows, dtype=jnp.uint32)).reshape(*lead, vocab)


def _straight_through(soft: Array, index: Array) -> Array:
    """Exact one-hot forward value, gradient of `soft`.

    (soft - stop_gradient(soft)) is exactly 0.0 in IEEE arithmetic, so hard + 0.0 is exactly hard.
    """
    hard = jax.nn.one_hot(index, soft.shape[-1], dtype=soft.dtype)
    return hard + (soft - jax.lax.stop_gradient(soft))


def gumbel_softmax(logits: Array, rng: Array, temperature: float | Array, hard: bool) -> Array:
    """Relaxed one-hot [.., V] in float32: softmax((logits + g) / tau); straight-through when hard."""
    logits = logits.astype(jnp.float32)
    u = (logits + gumbel_noise(rng, logits.shape)) / jnp.asarray(temperature, jnp.float32)
    soft = jax.nn.softmax(u, axis=-1)
    return _straight_through(soft, jnp.argmax(u, axis=-1)) if hard else soft


def argmax_tokens(logits: Array) -> Array:
    """Inference: the discrete De-Diffusion tokens, argmax of the (masked) logits, no noise."""
    return jnp.argmax(logits, axis=-1)


# --------------------------------------------------------------------------- schedules
def temperature_schedule(kind: str, start: float, end: float, total_steps: int) -> Callable[[Any], Array]:
    """Gumbel temperature as a function of the step; clamped to `end` after `total_steps`.

    kinds: constant (start), exponential (paper: 2.0 -> 0.3, start * (end/start)^(step/total)),
    linear, cosine (half cosine from start to end). Works on Python ints and traced steps.
    """
    if kind not in ("constant", "exponential", "linear", "cosine"):
        raise ValueError(f"unknown temperature schedule kind {kind!r}")
    if kind != "constant" and total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if kind == "exponential" and (start <= 0 or end <= 0):
        raise ValueError("exponential schedule needs positive start and end")

    def schedule(step: Any) -> Array:
        if kind == "constant":
            return jnp.asarray(start, jnp.float32)
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
        if kind == "exponential":
            return start * (end / start) ** frac
        if kind == "linear":
            return start + (end - start) * frac
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


# --------------------------------------------------------------------------- assembly
def _check_layout(num_tokens: int, context_length: int) -> None:
    if num_tokens + 2 > context_length:
        raise ValueError(f"{num_tokens} tokens + SOS + EOS do not fit the context length {context_length}")


def assemble_soft_tokens(token_probs: Array, bos_id: int, eos_id: int, pad_id: int,
                         context_length: int) -> Array:
    """[B, N, V] -> [B, L, V] laid out like the tokenizer's ids: [SOS, t1..tN, EOS, PAD...]."""
    batch, num, vocab = token_probs.shape
    _check_layout(num, context_length)
    ids = [bos_id] + [-1] * num + [eos_id] + [pad_id] * (context_length - num - 2)
    fixed = jax.nn.one_hot(jnp.asarray(ids), vocab, dtype=token_probs.dtype)  # id -1 -> all zeros
    fixed = jnp.broadcast_to(fixed[None], (batch, context_length, vocab))
    return fixed.at[:, 1:num + 1].set(token_probs)


def assemble_ids(token_ids: Array, bos_id: int, eos_id: int, pad_id: int, context_length: int) -> Array:
    """[B, N] -> [B, L] ids: [SOS, t1..tN, EOS, PAD...], equal to the tokenizer's padded layout."""
    batch, num = token_ids.shape
    _check_layout(num, context_length)
    col = lambda v, n: jnp.full((batch, n), v, dtype=token_ids.dtype)  # noqa: E731
    return jnp.concatenate([col(bos_id, 1), token_ids, col(eos_id, 1),
                            col(pad_id, context_length - num - 2)], axis=1)


def assemble_token_embeddings(token_embeds: Array, embedding_matrix: Array, bos_id: int, eos_id: int,
                              pad_id: int, context_length: int) -> Array:
    """[B, N, D] -> [B, L, D]: the same layout as `assemble_soft_tokens` followed by `@ E`.

    Used with `soft_token_embeddings` to feed the text encoder's token_embeds input.
    """
    batch, num, dim = token_embeds.shape
    _check_layout(num, context_length)
    rows = lambda ids: jnp.broadcast_to(  # noqa: E731
        embedding_matrix[jnp.asarray(ids)].astype(token_embeds.dtype)[None], (batch, len(ids), dim))
    parts = [rows([bos_id]), token_embeds, rows([eos_id])]
    if context_length > num + 2:
        parts.append(rows([pad_id] * (context_length - num - 2)))
    return jnp.concatenate(parts, axis=1)


def detokenize(tokenizer: Any, ids: Array | np.ndarray) -> list[str]:
    """[B, N] token ids -> the De-Diffusion texts (special tokens skipped)."""
    return tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=True)


# --------------------------------------------------------------------------- memory-lean embeddings
def _noise_for(noise_or_rng: Array, shape: Sequence[int]) -> Array:
    if jnp.issubdtype(noise_or_rng.dtype, jax.dtypes.prng_key) or (
            noise_or_rng.dtype == jnp.uint32 and noise_or_rng.shape == (2,)):
        return gumbel_noise(noise_or_rng, shape)
    return noise_or_rng.astype(jnp.float32)


def _embed_from_u(u: Array, hard: bool, embedding_matrix: Array) -> Array:
    """softmax(u) @ E, or (straight-through forward) E[argmax u]: exact one-hot @ E is a row gather."""
    if hard:
        return jnp.take(embedding_matrix, jnp.argmax(u, axis=-1), axis=0).astype(jnp.float32)
    return jax.nn.softmax(u, axis=-1) @ embedding_matrix.astype(jnp.float32)


def _relaxed_backward(u: Array, temperature: Array, hard: bool, embedding_matrix: Array,
                      g: Array, lead: int = 0) -> tuple[Array, Array, Array]:
    """Cotangents of (logits, temperature, E) given the output cotangent g.

    The logits/temperature get the soft gradient either way (straight-through); E's gradient is
    value^T g, and the forward value is the exact one-hot when `hard`. The first `lead` axes are kept
    apart in the temperature's and E's cotangents (the fused op's batch shards).
    """
    y = jax.nn.softmax(u, axis=-1)
    dy = g @ embedding_matrix.astype(jnp.float32).T
    du = y * (dy - jnp.sum(y * dy, axis=-1, keepdims=True))
    dlogits = du / temperature
    dtemp = -jnp.sum(du * u, axis=tuple(range(lead, u.ndim))) / temperature
    value = jax.nn.one_hot(jnp.argmax(u, axis=-1), u.shape[-1], dtype=jnp.float32) if hard else y
    rows = lambda a: a.reshape(*a.shape[:lead], -1, a.shape[-1])  # noqa: E731
    dembed = jnp.einsum("...rv,...rd->...vd", rows(value), rows(g))
    return dlogits, dtemp, dembed


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _soft_embed(logits: Array, noise_or_rng: Array, temperature: Array, hard: bool,
                embedding_matrix: Array) -> Array:
    return _soft_embed_fwd(logits, noise_or_rng, temperature, hard, embedding_matrix)[0]


def _soft_embed_fwd(logits, noise_or_rng, temperature, hard, embedding_matrix):
    u = (logits.astype(jnp.float32) + _noise_for(noise_or_rng, logits.shape)) / temperature
    return _embed_from_u(u, hard, embedding_matrix), (logits, noise_or_rng, temperature, embedding_matrix)


def _soft_embed_bwd(hard, res, g):
    logits, noise_or_rng, temperature, embedding_matrix = res
    noise = _noise_for(noise_or_rng, logits.shape)
    u = (logits.astype(jnp.float32) + noise) / temperature
    dlogits, dtemp, dembed = _relaxed_backward(u, temperature, hard, embedding_matrix,
                                               g.astype(jnp.float32))
    dnoise = None if jnp.issubdtype(noise_or_rng.dtype, jax.dtypes.prng_key) or (
        noise_or_rng.dtype == jnp.uint32) else dlogits.astype(noise_or_rng.dtype)
    return (dlogits.astype(logits.dtype), dnoise, dtemp.astype(temperature.dtype),
            dembed.astype(embedding_matrix.dtype))


_soft_embed.defvjp(_soft_embed_fwd, _soft_embed_bwd)


def soft_token_embeddings(logits: Array, gumbel_noise_or_rng: Array, temperature: float | Array,
                          hard: bool, embedding_matrix: Array) -> Array:
    """`gumbel_softmax(logits, rng, tau, hard) @ E` -> [B, N, D] without keeping the soft one-hot.

    Pass an rng key (recommended: only the logits are kept for the backward pass, the noise and the
    softmax are recomputed there) or an explicit noise array (then it is kept too). Forward value and
    gradients equal the plain formulation's; with `hard` the forward is an exact row gather of E.
    """
    return _soft_embed(logits, gumbel_noise_or_rng, jnp.asarray(temperature, jnp.float32), hard,
                       embedding_matrix)


# The fused op's chunking (measured by bench/vocab_head.py: bench/README.md, its section).
# By default (rows_per_chunk 0 or None) a batch shard's query rows are cut into the fewest equal chunks,
# at least 2, whose ROW_BUFFERS float32 [chunk, V] buffers (an upper bound on what one chunk holds at
# once on XLA:CPU) fit CHUNK_BUDGET_MB: at V = 49,408, at most 80 rows a chunk (4 x 75 rows for 4
# images). Fewer, larger chunks are faster (each chunk streams the [C, V] head, its gradient and E once
# more: 16-row chunks take 2x the time of 64-row ones at the paper's width on CPU), and past ~64 rows
# the time flattens. At least 2, because a single chunk runs with no loop around it, and XLA is then
# free to schedule its work among the decoder's: on XLA:CPU a train step at V = 49,408 and 300 rows
# then needs 822 MB of temporaries instead of 542 MB; a loop's body stays out of the step's peak, and
# at a world's V = 606 a loop of 2 chunks is as fast as one pass.
CHUNK_BUDGET_MB = 64.0
ROW_BUFFERS = 4


def auto_rows_per_chunk(rows: int, vocab_size: int, budget_mb: float = CHUNK_BUDGET_MB) -> int:
    """Rows a chunk of the fused op for `rows` query rows of one batch shard: the fewest equal chunks,
    at least 2, whose ROW_BUFFERS float32 [chunk, V] buffers fit `budget_mb` (10^6 bytes); at least 1."""
    rows = max(int(rows), 1)
    cap = max(1, int(budget_mb * 1e6 // (ROW_BUFFERS * vocab_size * 4)))
    chunks = min(rows, max(2, -(-rows // cap)))
    return -(-rows // chunks)


def _to_chunks(x: Array, shards: int, rows_per_chunk: int) -> Array:
    """[R, ...] rows -> [chunks, shards, rows_per_chunk, ...]: each shard's rows (a contiguous R/shards,
    the batch sharding's split) cut into chunks, zero-padded. The loop runs over the unsharded leading
    axis, so under data parallelism every device loops over its own rows only."""
    rows, rest = x.shape[0], x.shape[1:]
    local = rows // shards
    chunks = -(-local // rows_per_chunk)
    x = x.reshape(shards, local, *rest)
    x = jnp.pad(x, ((0, 0), (0, chunks * rows_per_chunk - local)) + ((0, 0),) * len(rest))
    return jnp.moveaxis(x.reshape(shards, chunks, rows_per_chunk, *rest), 1, 0)


def _from_chunks(y: Array, rows: int) -> Array:
    """Inverse of `_to_chunks` (padding dropped): [chunks, shards, rows_per_chunk, ...] -> [rows, ...]."""
    y = jnp.moveaxis(y, 0, 1)
    shards, rest = y.shape[0], y.shape[3:]
    return y.reshape(shards, -1, *rest)[:, : rows // shards].reshape(rows, *rest)


def _over_chunks(body: Callable, init: Any, xs: Any, shards: int) -> tuple[Any, Any]:
    """`lax.scan(body, init, xs)`, or one plain call when there is one chunk (no loop at all). The loop
    runs in a named scope that says how many batch shards its chunks hold, which is how
    `dediffusion_jax.loop_flops` counts the body's FLOPs per device."""
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        carry, y = body(init, jax.tree.map(lambda a: a[0], xs))
        return carry, jax.tree.map(lambda a: a[None], y)
    with loop_flops.sharded_scope("fused_vocab_head", shards):
        return jax.lax.scan(body, init, xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 8, 9, 10))
def _fused(features, kernel, bias, mask, rng, temperature, hard, embedding_matrix, rows_per_chunk,
           embedding_grad, shards):
    return _fused_fwd(features, kernel, bias, mask, rng, temperature, hard, embedding_matrix,
                      rows_per_chunk, embedding_grad, shards)[0]


def _fused_chunk_u(x_c, idx_c, kernel, bias, mask, rng, temperature):
    """u = (masked logits + Gumbel noise) / tau for a chunk x_c [.., C] whose rows have indices idx_c."""
    logits = apply_mask(x_c.astype(jnp.float32) @ kernel.astype(jnp.float32)
                        + bias.astype(jnp.float32), mask)
    draw = jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(rng, i), (kernel.shape[1],),
                                                jnp.float32))
    return (logits + draw(idx_c.reshape(-1)).reshape(logits.shape)) / temperature


def _fused_inputs(features, rows_per_chunk, shards, *more):
    """Flattened rows and their Gumbel indices (plus `more` [.., k] arrays), cut by `_to_chunks`."""
    rows = math.prod(features.shape[:-1])
    flat = [features.reshape(rows, -1), jnp.arange(rows, dtype=jnp.uint32)]
    flat += [m.reshape(rows, -1) for m in more]
    return rows, [_to_chunks(a, shards, rows_per_chunk) for a in flat]


def _fused_fwd(features, kernel, bias, mask, rng, temperature, hard, embedding_matrix, rows_per_chunk,
               embedding_grad, shards):
    rows, (x, idx) = _fused_inputs(features, rows_per_chunk, shards)

    def one(carry, args):
        u = _fused_chunk_u(*args, kernel, bias, mask, rng, temperature)
        return carry, _embed_from_u(u, hard, embedding_matrix)

    out = _from_chunks(_over_chunks(one, (), (x, idx), shards)[1], rows)
    out = out.reshape(*features.shape[:-1], embedding_matrix.shape[1])
    return out, (features, kernel, bias, mask, rng, temperature, embedding_matrix)


def _fused_bwd(hard, rows_per_chunk, embedding_grad, shards, res, g):
    features, kernel, bias, mask, rng, temperature, embedding_matrix = res
    # The barrier (as jax.checkpoint's, with the cotangent in it) keeps XLA from merging this
    # recomputation with the forward's by common-subexpression elimination, which would keep the
    # forward's [rows, V] noise and logits alive across the decoder, the very residuals this op exists
    # to avoid (measured: with one chunk XLA:CPU merged them; a loop also prevents it). It does not stop
    # XLA:CPU from scheduling a one-chunk recomputation early: hence at least 2 chunks by default.
    features, kernel, bias, rng, g = jax.lax.optimization_barrier((features, kernel, bias, rng, g))
    # Padded rows get g = 0, so they add nothing to any gradient.
    rows, (x, idx, gc) = _fused_inputs(features, rows_per_chunk, shards, g.astype(jnp.float32))
    k32 = kernel.astype(jnp.float32)

    def step(carry, args):  # per batch shard: [S, ..] partial sums, added up once after the loop
        dkernel, dbias, dtemp, dembed = carry
        x_c, idx_c, g_c = args
        u = _fused_chunk_u(x_c, idx_c, kernel, bias, mask, rng, temperature)
        dlogits, dt, de = _relaxed_backward(u, temperature, hard, embedding_matrix, g_c, lead=1)
        dlogits = jnp.where(jnp.asarray(mask), 0.0, dlogits)
        dx = dlogits @ k32.T
        carry = (dkernel + jnp.einsum("src,srv->scv", x_c.astype(jnp.float32), dlogits),
                 dbias + dlogits.sum(1), dtemp + dt, dembed + de if embedding_grad else dembed)
        return carry, dx

    init = (jnp.zeros((shards, *kernel.shape), jnp.float32), jnp.zeros((shards, *bias.shape), jnp.float32),
            jnp.zeros((shards,), jnp.float32),
            jnp.zeros((shards, *embedding_matrix.shape) if embedding_grad else (), jnp.float32))
    (dkernel, dbias, dtemp, dembed), dx = _over_chunks(step, init, (x, idx, gc), shards)
    dx = _from_chunks(dx, rows).reshape(features.shape)
    dembed = (dembed.sum(0).astype(embedding_matrix.dtype) if embedding_grad
              else jnp.zeros_like(embedding_matrix))
    return (dx.astype(features.dtype), dkernel.sum(0).astype(kernel.dtype), dbias.sum(0).astype(bias.dtype),
            None, None, dtemp.sum(0).astype(temperature.dtype), dembed)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_soft_token_embeddings(features: Array, kernel: Array, bias: Array, mask: Array | np.ndarray,
                                rng: Array, temperature: float | Array, hard: bool,
                                embedding_matrix: Array, rows_per_chunk: int | None = None,
                                embedding_grad: bool = False, *, chunk_budget_mb: float = CHUNK_BUDGET_MB,
                                batch_shards: int = 1) -> Array:
    """Vocabulary head + Gumbel-softmax + `@ E` in one op that never keeps (or builds) [B, N, V].

    features [.., C] are the pooler outputs; kernel [C, V] / bias [V] the head's Dense parameters
    (params['vocab_head']['dense']); mask [V] the exclusion mask. Logits are recomputed in float32, chunk
    by chunk of query rows, in both passes; only the features and the rng are kept. `rows_per_chunk`
    (rows of one batch shard): 0 or None = `auto_rows_per_chunk` under `chunk_budget_mb`; one chunk runs
    with no loop. `batch_shards`: how many ways the leading (batch) axis is split over devices (the
    mesh's data x fsdp): each shard's rows are chunked apart, so a device loops over its own rows and
    the head's gradient is summed across devices once, after the loop (with 1 under data parallelism
    every device would run every chunk of the global batch); 1 when it does not divide the leading axis.
    Equals `soft_token_embeddings(head(features), rng, ...)` in value and gradients, whatever the
    chunking. The gradient w.r.t. E is computed only when `embedding_grad` (the decoder's E is frozen;
    zeros otherwise).
    """
    rows = math.prod(features.shape[:-1])
    lead = features.shape[0] if features.ndim > 1 else 1
    shards = int(batch_shards) if batch_shards and lead % int(batch_shards) == 0 else 1
    local = rows // shards
    chunk = int(rows_per_chunk or 0) or auto_rows_per_chunk(local, kernel.shape[1], chunk_budget_mb)
    return _fused(features, kernel, bias, jnp.asarray(mask, jnp.bool_), rng,
                  jnp.asarray(temperature, jnp.float32), hard, embedding_matrix, max(1, min(chunk, local)),
                  embedding_grad, shards)
