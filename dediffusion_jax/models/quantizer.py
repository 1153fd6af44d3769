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
fully built: that is the one that removes the 14.8 MB/example.
Measured with XLA's memory analysis on CPU: value_and_grad w.r.t. the head (kernel [128, V], bias) of a
mean-squared loss on the [B, N, 64] embeddings, B = 4, N = 75, V = 49,408, soft; per example
(`tests/test_quantizer.py::test_memory_report` prints them):
  formulation                      saved residuals   XLA temp (peak temporaries of the compiled step)
  plain gumbel_softmax @ E             14.88 MB          74.11 MB
  soft_token_embeddings (logits)       14.88 MB          74.11 MB
  fused (rows_per_chunk = 16)           0.06 MB           7.24 MB
"Saved residuals" is what autodiff keeps from the forward to the backward pass (what stays alive while the
decoder runs); arguments (head 25.3 MB + E 12.6 MB) are the same for all three.
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
                      g: Array) -> tuple[Array, Array, Array]:
    """Cotangents of (logits, temperature, E) given the output cotangent g.

    The logits/temperature get the soft gradient either way (straight-through); E's gradient is
    value^T g, and the forward value is the exact one-hot when `hard`.
    """
    y = jax.nn.softmax(u, axis=-1)
    dy = g @ embedding_matrix.astype(jnp.float32).T
    du = y * (dy - jnp.sum(y * dy, axis=-1, keepdims=True))
    dlogits = du / temperature
    dtemp = -jnp.sum(du * u) / temperature
    value = jax.nn.one_hot(jnp.argmax(u, axis=-1), u.shape[-1], dtype=jnp.float32) if hard else y
    dembed = jnp.einsum("...v,...d->vd", value, g)
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


def _chunked_rows(x: Array, rows_per_chunk: int) -> tuple[Array, int]:
    rows = x.shape[0]
    chunks = -(-rows // rows_per_chunk)
    pad = chunks * rows_per_chunk - rows
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape(chunks, rows_per_chunk, *x.shape[1:]), pad


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 8, 9))
def _fused(features, kernel, bias, mask, rng, temperature, hard, embedding_matrix, rows_per_chunk,
           embedding_grad):
    return _fused_fwd(features, kernel, bias, mask, rng, temperature, hard, embedding_matrix,
                      rows_per_chunk, embedding_grad)[0]


def _fused_chunk_u(x_c, idx_c, kernel, bias, mask, rng, temperature):
    logits = apply_mask(x_c.astype(jnp.float32) @ kernel.astype(jnp.float32)
                        + bias.astype(jnp.float32), mask)
    draw = jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(rng, i), (kernel.shape[1],),
                                                jnp.float32))
    return (logits + draw(idx_c)) / temperature


def _fused_fwd(features, kernel, bias, mask, rng, temperature, hard, embedding_matrix, rows_per_chunk,
               embedding_grad):
    *lead, width = features.shape
    x, _ = _chunked_rows(features.reshape(-1, width), rows_per_chunk)
    idx, _ = _chunked_rows(jnp.arange(math.prod(lead), dtype=jnp.uint32), rows_per_chunk)

    def one(args):
        x_c, idx_c = args
        u = _fused_chunk_u(x_c, idx_c, kernel, bias, mask, rng, temperature)
        return _embed_from_u(u, hard, embedding_matrix)

    out = jax.lax.map(one, (x, idx)).reshape(-1, embedding_matrix.shape[1])[: math.prod(lead)]
    out = out.reshape(*lead, embedding_matrix.shape[1])
    return out, (features, kernel, bias, mask, rng, temperature, embedding_matrix)


def _fused_bwd(hard, rows_per_chunk, embedding_grad, res, g):
    features, kernel, bias, mask, rng, temperature, embedding_matrix = res
    *lead, width = features.shape
    x, _ = _chunked_rows(features.reshape(-1, width), rows_per_chunk)
    idx, _ = _chunked_rows(jnp.arange(math.prod(lead), dtype=jnp.uint32), rows_per_chunk)
    gc, _ = _chunked_rows(g.reshape(-1, g.shape[-1]).astype(jnp.float32), rows_per_chunk)  # pad rows: g = 0
    k32 = kernel.astype(jnp.float32)

    def step(carry, args):
        dkernel, dbias, dtemp, dembed = carry
        x_c, idx_c, g_c = args
        u = _fused_chunk_u(x_c, idx_c, kernel, bias, mask, rng, temperature)
        dlogits, dt, de = _relaxed_backward(u, temperature, hard, embedding_matrix, g_c)
        dlogits = jnp.where(jnp.asarray(mask), 0.0, dlogits)
        dx = dlogits @ k32.T
        carry = (dkernel + x_c.astype(jnp.float32).T @ dlogits, dbias + dlogits.sum(0), dtemp + dt,
                 dembed + de if embedding_grad else dembed)
        return carry, dx

    init = (jnp.zeros(kernel.shape, jnp.float32), jnp.zeros(bias.shape, jnp.float32),
            jnp.zeros((), jnp.float32),
            jnp.zeros(embedding_matrix.shape if embedding_grad else (), jnp.float32))
    (dkernel, dbias, dtemp, dembed), dx = jax.lax.scan(step, init, (x, idx, gc))
    dx = dx.reshape(-1, width)[: math.prod(lead)].reshape(features.shape)
    dembed = dembed.astype(embedding_matrix.dtype) if embedding_grad else jnp.zeros_like(embedding_matrix)
    return (dx.astype(features.dtype), dkernel.astype(kernel.dtype), dbias.astype(bias.dtype), None, None,
            dtemp.astype(temperature.dtype), dembed)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_soft_token_embeddings(features: Array, kernel: Array, bias: Array, mask: Array | np.ndarray,
                                rng: Array, temperature: float | Array, hard: bool,
                                embedding_matrix: Array, rows_per_chunk: int = 16,
                                embedding_grad: bool = False) -> Array:
    """Vocabulary head + Gumbel-softmax + `@ E` in one op that never keeps (or builds) [B, N, V].

    features [.., C] are the pooler outputs; kernel [C, V] / bias [V] the head's Dense parameters
    (params['vocab_head']['dense']); mask [V] the exclusion mask. Logits are recomputed in float32, chunk
    by chunk of `rows_per_chunk` query rows, in both passes; only the features and the rng are kept.
    Equals `soft_token_embeddings(head(features), rng, ...)` in value and gradients. The gradient w.r.t.
    E is computed only when `embedding_grad` (the decoder's E is frozen; zeros otherwise).
    """
    return _fused(features, kernel, bias, jnp.asarray(mask, jnp.bool_), rng,
                  jnp.asarray(temperature, jnp.float32), hard, embedding_matrix, rows_per_chunk,
                  embedding_grad)
