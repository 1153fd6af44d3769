"""Attentional pooler: N learned queries read the image tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dediffusion_jax.models.pooler import AttentionalPooler


@pytest.mark.parametrize("token_dim", [32, 48])  # equal to the width, and projected to it
def test_pooler_shapes_and_dependence_on_every_image_token(token_dim):
    pooler = AttentionalPooler(num_queries=5, num_blocks=2, width=32, num_heads=4)
    tokens = jax.random.normal(jax.random.key(0), (3, 7, token_dim))
    params = pooler.init(jax.random.key(1), tokens)
    assert ("context_proj" in params["params"]) == (token_dim != 32)
    assert params["params"]["queries"].shape == (5, 32)
    apply = jax.jit(pooler.apply)
    out = apply(params, tokens)
    assert out.shape == (3, 5, 32) and out.dtype == jnp.float32
    for t in (0, 6):  # changing one image token of example 1 changes example 1 only
        # (a random change: a constant shift of a token is removed by the context LayerNorm)
        changed = apply(params, tokens.at[1, t].add(jax.random.normal(jax.random.key(t), (token_dim,))))
        assert np.abs(np.asarray(changed[1] - out[1])).max() > 1e-4
        np.testing.assert_array_equal(np.asarray(changed)[[0, 2]], np.asarray(out)[[0, 2]])
    # Every query gets a gradient from the image tokens (cross-attention is wired).
    grad = jax.grad(lambda x: apply(params, x).sum(axis=(0, 2)).sum())(tokens)
    assert np.all(np.abs(np.asarray(grad)).sum(-1) > 0)


@pytest.mark.slow  # the default run stayed over 20 min on a slower 2-core machine (2026-12-07): .ci/run's slow phase runs it
def test_pooler_remat_and_bf16_agree_with_the_plain_float32_pooler():
    tokens = jax.random.normal(jax.random.key(0), (2, 9, 16))
    plain = AttentionalPooler(4, 2, 16, 2)
    params = plain.init(jax.random.key(1), tokens)
    out = plain.apply(params, tokens)
    loss = lambda m: jax.grad(lambda p: m.apply(p, tokens).sum())(params)  # noqa: E731
    remat = AttentionalPooler(4, 2, 16, 2, remat=True)
    np.testing.assert_allclose(remat.apply(params, tokens), out, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), loss(remat), loss(plain))
    bf16 = AttentionalPooler(4, 2, 16, 2, dtype=jnp.bfloat16).apply(params, tokens)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf16.astype(jnp.float32), out, atol=0.1)
