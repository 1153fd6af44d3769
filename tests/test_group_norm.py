"""nn_blocks.GroupNorm: torch.nn.GroupNorm's numbers on channels-last arrays, flax's parameter names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dediffusion_jax.t2i.nn_blocks import GroupNorm


def _params(channels, seed=2):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"params": {"scale": 1 + jax.random.normal(k1, (channels,)), "bias": jax.random.normal(k2, (channels,))}}


@pytest.mark.parametrize("shape, groups", [((4, 6, 5, 32), 8), ((2, 16, 16, 64), 32), ((3, 7, 12), 4)])
def test_matches_torch_and_flax(shape, groups):
    x = 3 * jax.random.normal(jax.random.key(0), shape) + 1
    params = _params(shape[-1])
    ours = GroupNorm(groups, 1e-5).apply(params, x)
    flax_out = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False).apply(params, x)
    norm = torch.nn.GroupNorm(groups, shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(np.asarray(params["params"]["scale"])))
        norm.bias.copy_(torch.from_numpy(np.asarray(params["params"]["bias"])))
        channels_first = torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())
        reference = np.moveaxis(norm(channels_first).numpy(), 1, -1)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    np.testing.assert_allclose(ours, flax_out, atol=1e-5)


def test_gradients_match_flax():
    x = jax.random.normal(jax.random.key(0), (4, 6, 5, 32))
    weights = jax.random.normal(jax.random.key(1), x.shape)
    params = _params(32)
    ours = jax.grad(lambda p, x: (GroupNorm(8, 1e-5).apply(p, x) * weights).sum(), argnums=(0, 1))(params, x)
    theirs = jax.grad(lambda p, x: (nn.GroupNorm(num_groups=8, epsilon=1e-5, use_fast_variance=False)
                                    .apply(p, x) * weights).sum(), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_parameter_names_are_flax_s_and_a_bad_group_count_is_named():
    tree = GroupNorm(8, 1e-5).init(jax.random.key(0), jnp.zeros((1, 4, 4, 16)))
    assert jax.tree.map(jnp.shape, tree) == {"params": {"scale": (16,), "bias": (16,)}}
    with pytest.raises(ValueError, match="12 channels do not split into 8 groups"):
        GroupNorm(8, 1e-5).init(jax.random.key(0), jnp.zeros((1, 4, 4, 12)))
