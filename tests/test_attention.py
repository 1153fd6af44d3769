"""The CPU attention loop computes what the plain formulation computes, in every model that uses it,
and keeps a batch-sharded computation free of gathers.

The plain formulation is the one the parity tests check against diffusers and transformers, so
equality here carries that parity over to the loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dediffusion_jax.t2i import attention, clip_text, vae
from dediffusion_jax.t2i.attention import dot_product_attention
from dediffusion_jax.t2i.unet import UNet2DConditionModel, UNetConfig, dummy_inputs


def _qkv(b=16, h=2, lq=12, lk=12, d=8, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(3 * jax.random.normal(key, (b, h, n, d)).astype(dtype) for key, n in zip(keys, (lq, lk, lk)))


@pytest.fixture
def one_example_per_iteration(monkeypatch):
    """The loop as a single-device machine runs it: one example per iteration."""
    monkeypatch.setattr(attention, "_samples_per_iteration", lambda batch: 1)


MASKS = {
    "none": None,
    "causal, shared": jnp.tril(jnp.ones((12, 12), bool))[None, None],
    "per example": jax.random.bernoulli(jax.random.key(3), 0.7, (16, 1, 12, 12)).at[..., 0].set(True),
}


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_loop_equals_plain_values_and_gradients(one_example_per_iteration, mask):
    q, k, v = _qkv()
    weights = jax.random.normal(jax.random.key(9), q.shape)

    def loss(impl):
        return lambda q, k, v: (dot_product_attention(q, k, v, mask, scale=0.3, implementation=impl) * weights).sum()

    plain = dot_product_attention(q, k, v, mask, scale=0.3, implementation="plain")
    loop = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask, scale=0.3, implementation="loop"))(q, k, v)
    np.testing.assert_allclose(loop, plain, atol=1e-5, rtol=1e-5)
    grads_plain = jax.grad(loss("plain"), argnums=(0, 1, 2))(q, k, v)
    grads_loop = jax.jit(jax.grad(loss("loop"), argnums=(0, 1, 2)))(q, k, v)
    for g_loop, g_plain in zip(grads_loop, grads_plain):
        np.testing.assert_allclose(g_loop, g_plain, atol=1e-5, rtol=1e-4)


def test_loop_in_bfloat16_stays_close_to_plain(one_example_per_iteration):
    q, k, v = (t.astype(jnp.bfloat16) for t in _qkv())
    plain = dot_product_attention(q, k, v, scale=0.3, implementation="plain")
    loop = dot_product_attention(q, k, v, scale=0.3, implementation="loop")
    assert loop.dtype == plain.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(loop, np.float32), np.asarray(plain, np.float32), atol=0.125, rtol=0.02)


def test_loop_gradients_in_bfloat16_keep_the_dtypes_and_stay_close_to_float32(one_example_per_iteration):
    """The flash backward computes in float32 and returns each input's dtype (q and k float32 as
    `upcast` leaves them, v bfloat16)."""
    q, k, v = _qkv()
    weights = jax.random.normal(jax.random.key(9), q.shape)

    def grads(v, impl):
        loss = lambda q, k, v: (dot_product_attention(q, k, v, scale=0.3, implementation=impl)  # noqa: E731
                                .astype(jnp.float32) * weights).sum()
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    mixed = grads(v.astype(jnp.bfloat16), "loop")
    assert [g.dtype for g in mixed] == [jnp.float32, jnp.float32, jnp.bfloat16]
    for g_mixed, g_exact in zip(mixed, grads(v, "plain")):
        scale = float(jnp.abs(g_exact).max())
        np.testing.assert_allclose(np.asarray(g_mixed, np.float32) / scale, g_exact / scale, atol=0.03)


def test_auto_loops_on_cpu_only_for_large_logits(monkeypatch):
    monkeypatch.setattr(attention, "_samples_per_iteration", lambda batch: 1)
    monkeypatch.delenv("DEDIFFUSION_ATTENTION", raising=False)
    assert attention._choose(None, attention.LOOP_ABOVE_BYTES + 1, 1, 32) == "loop"
    assert attention._choose(None, attention.LOOP_ABOVE_BYTES, 1, 32) == "plain"
    assert attention._choose(None, attention.LOOP_ABOVE_BYTES + 1, 32, 32) == "plain"  # nothing to split
    monkeypatch.setenv("DEDIFFUSION_ATTENTION", "plain")
    assert attention._choose(None, attention.LOOP_ABOVE_BYTES + 1, 1, 32) == "plain"
    monkeypatch.setenv("DEDIFFUSION_ATTENTION", "flash")
    with pytest.raises(ValueError, match="'flash'.*auto, plain, loop"):
        attention._choose(None, 0, 1, 32)


def test_batch_sharded_loop_equals_one_device_and_gathers_nothing():
    """With the batch over 8 devices, each iteration takes one example per device (no all-gather),
    forward and backward."""
    assert jax.device_count() == 8
    q, k, v = _qkv(b=32)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    fn = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, scale=0.3, implementation="loop"),
                 in_shardings=(sharding,) * 3, out_shardings=sharding)
    sharded = jax.device_put((q, k, v), sharding)
    assert "all-gather" not in fn.lower(*sharded).compile().as_text()
    single = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, scale=0.3, implementation="plain"))(q, k, v)
    np.testing.assert_allclose(fn(*sharded), single, atol=1e-5, rtol=1e-5)

    def loss(impl):
        return lambda q, k, v: jnp.tanh(dot_product_attention(q, k, v, scale=0.3, implementation=impl)).sum()

    grad = jax.jit(jax.grad(loss("loop"), argnums=(0, 1, 2)), in_shardings=(sharding,) * 3, out_shardings=sharding)
    assert "all-gather" not in grad.lower(*sharded).compile().as_text()  # the flash backward too
    for ours, plain in zip(grad(*sharded), jax.grad(loss("plain"), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(ours, plain, atol=1e-5, rtol=1e-4)


def _both(monkeypatch, fn):
    """fn() with the plain formulation, then with the loop at one example per iteration (fn jits a
    fresh function each call, so each traces with the implementation set at that moment)."""
    monkeypatch.setenv("DEDIFFUSION_ATTENTION", "plain")
    assert "scan" not in str(jax.make_jaxpr(lambda: fn())())
    plain = fn()
    monkeypatch.setenv("DEDIFFUSION_ATTENTION", "loop")
    monkeypatch.setattr(attention, "_samples_per_iteration", lambda batch: 1)
    assert "scan" in str(jax.make_jaxpr(lambda: fn())())  # the loop is what runs
    return plain, fn()


def test_unet_with_the_loop_equals_plain(monkeypatch):
    config = UNetConfig.from_dict({
        "sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
        "attention_head_dim": 2, "cross_attention_dim": 16, "norm_num_groups": 8})
    model = UNet2DConditionModel(config)
    params = model.init(jax.random.key(0), *dummy_inputs(config))["params"]
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    text = jax.random.normal(jax.random.key(2), (4, 7, 16))
    t = jnp.array([1, 200, 500, 999])

    def text_grad():
        return jax.jit(jax.grad(lambda c: (model.apply({"params": params}, x, t, c) ** 2).sum()))(text)

    plain, loop = _both(monkeypatch, text_grad)
    np.testing.assert_allclose(loop, plain, atol=1e-5, rtol=1e-4)
    assert np.abs(plain).max() > 1e-3


def test_clip_text_with_the_loop_equals_plain(monkeypatch):
    config = clip_text.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16)
    model = clip_text.CLIPTextModel(config)
    params = model.init(jax.random.key(0), *clip_text.dummy_inputs(config))["params"]
    ids = jax.random.randint(jax.random.key(1), (4, 16), 0, 99)
    apply = lambda i: model.apply({"params": params}, i).last_hidden_state  # noqa: E731
    plain, loop = _both(monkeypatch, lambda: jax.jit(lambda i: apply(i))(ids))
    np.testing.assert_allclose(loop, plain, atol=1e-5, rtol=1e-4)


def test_vae_with_the_loop_equals_plain(monkeypatch):
    config = vae.VAEConfig(block_out_channels=(32,), norm_num_groups=8, latent_channels=4)
    model = vae.AutoencoderKL(config)
    params = model.init(jax.random.key(0), *vae.dummy_inputs(config))["params"]
    z = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))
    decode = lambda z: model.apply({"params": params}, z, method=model.decode)  # noqa: E731
    plain, loop = _both(monkeypatch, lambda: jax.jit(lambda z: decode(z))(z))
    np.testing.assert_allclose(loop, plain, atol=1e-5, rtol=1e-4)
