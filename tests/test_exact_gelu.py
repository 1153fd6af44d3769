"""`custom_grads.exact_gelu`: torch's erf GELU (the faster formula on XLA:CPU), in float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from dediffusion_jax.t2i.custom_grads import exact_gelu


def test_it_matches_torch_and_jax_in_float32():
    x = np.linspace(-12, 12, 20001, dtype=np.float32)
    ours = np.asarray(exact_gelu(jnp.asarray(x)))
    np.testing.assert_allclose(ours, torch.nn.functional.gelu(torch.from_numpy(x)).numpy(), atol=2e-6, rtol=0)
    np.testing.assert_allclose(ours, np.asarray(jax.nn.gelu(x, approximate=False)), atol=2e-6, rtol=0)
    grad = np.asarray(jax.grad(lambda t: exact_gelu(t).sum())(jnp.asarray(x)))
    np.testing.assert_allclose(grad, np.asarray(jax.grad(lambda t: jax.nn.gelu(t, approximate=False).sum())(x)),
                               atol=1e-6, rtol=0)


def test_bfloat16_keeps_the_negative_tail_as_torch_does():
    x = np.linspace(-5, 5, 11, dtype=np.float32)
    ours = exact_gelu(jnp.asarray(x, jnp.bfloat16))
    assert ours.dtype == jnp.bfloat16
    theirs = torch.nn.functional.gelu(torch.from_numpy(x).bfloat16()).float().numpy()
    np.testing.assert_allclose(np.asarray(ours, np.float32), theirs, rtol=1e-2, atol=1e-6)
    assert float(ours[1]) < 0  # gelu(-4) = -1.3e-4, which 1 + erf(x) in bfloat16 would round to 0
