"""custom_grads: the hand-written backward passes give autodiff's gradients of the same formulas.

The forwards are the formulas the modules computed before (their parity with torch is tested in
test_group_norm.py and test_unet.py), so a gradient equal to autodiff's carries that parity over.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dediffusion_jax.t2i import custom_grads


def _reference_group_norm(x, scale, bias, groups, eps):
    b, length, c = x.shape
    grouped = x.reshape(b, length, groups, c // groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
    return ((grouped - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias


def _reference_layer_norm(x, scale, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(axis=-1, keepdims=True) + eps) * scale + bias


def _reference_geglu(projected):
    value, gate = jnp.split(projected, 2, axis=-1)
    return value * jax.nn.gelu(gate.astype(jnp.float32), approximate=False).astype(gate.dtype)


def _inputs(shape, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = 2.0 + 3.0 * jax.random.normal(keys[0], shape)  # an offset and a spread the norms must remove
    scale = 1.0 + 0.5 * jax.random.normal(keys[1], shape[-1:])
    bias = jax.random.normal(keys[2], shape[-1:])
    weights = jax.random.normal(keys[3], shape)  # a loss that is not a plain sum
    return x, scale, bias, weights


def _assert_same_values_and_gradients(ours, reference, args, weights, atol):
    np.testing.assert_allclose(ours(*args), reference(*args), atol=atol, rtol=atol)
    argnums = tuple(range(len(args)))
    mine = jax.jit(jax.grad(lambda *a: (jnp.tanh(ours(*a)) * weights).sum(), argnums))(*args)
    theirs = jax.grad(lambda *a: (jnp.tanh(reference(*a)) * weights).sum(), argnums)(*args)
    for m, t in zip(mine, theirs):
        np.testing.assert_allclose(m, t, atol=atol, rtol=atol)
        assert np.abs(np.asarray(t)).max() > 1e-3  # a gradient that is not trivially zero


@pytest.mark.parametrize("groups", [1, 4, 32])
def test_group_norm_gradients_equal_autodiff(groups):
    x, scale, bias, weights = _inputs((3, 50, 64))
    _assert_same_values_and_gradients(
        lambda x, s, b: custom_grads.group_norm(x, s, b, groups, 1e-5),
        lambda x, s, b: _reference_group_norm(x, s, b, groups, 1e-5), (x, scale, bias), weights, 2e-5)


def test_layer_norm_gradients_equal_autodiff():
    x, scale, bias, weights = _inputs((2, 3, 17, 40))
    _assert_same_values_and_gradients(
        lambda x, s, b: custom_grads.layer_norm(x, s, b, 1e-5),
        lambda x, s, b: _reference_layer_norm(x, s, b, 1e-5), (x, scale, bias), weights, 2e-5)


def test_geglu_gradients_equal_autodiff():
    projected, _, _, weights = _inputs((2, 30, 48))
    _assert_same_values_and_gradients(custom_grads.geglu, _reference_geglu, (projected,), weights[..., :24], 2e-5)


def test_geglu_in_bfloat16_keeps_the_dtype_and_stays_close():
    projected, _, _, weights = _inputs((2, 30, 48))
    loss = lambda f: lambda p: (f(p).astype(jnp.float32) * weights[..., :24]).sum()  # noqa: E731
    grad16 = jax.grad(loss(custom_grads.geglu))(projected.astype(jnp.bfloat16))
    grad32 = jax.grad(loss(_reference_geglu))(projected)
    assert grad16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(grad16, np.float32), grad32, atol=0.05, rtol=0.02)


def test_norms_under_remat_and_a_batch_sharded_mesh_equal_one_device():
    """The trainer's mesh splits the batch over devices; each example's statistics stay on its device."""
    assert jax.device_count() == 8
    x, scale, bias, weights = _inputs((8, 16, 32))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    @jax.checkpoint
    def block(x):
        h = custom_grads.group_norm(x, scale, bias, 4, 1e-5)
        return custom_grads.geglu(custom_grads.layer_norm(h, scale, bias, 1e-5))

    grad = jax.grad(lambda x, w: (block(x) * w).sum())
    sharded = jax.jit(grad, in_shardings=(batch, batch), out_shardings=batch)
    assert "all-gather" not in sharded.lower(x, weights[..., :16]).compile().as_text()
    np.testing.assert_allclose(sharded(x, weights[..., :16]), jax.jit(grad)(x, weights[..., :16]), atol=1e-5, rtol=1e-5)


# The convolution with pre-flipped kernels: (input size, kernel, stride, padding) as the UNet and VAE
# use them (3x3 same, 1x1, diffusers' stride-2 downsampling with padding 0 = right/bottom by one, and
# symmetric stride 2), on odd sizes too.
CONV_CASES = [((9, 9), 3, 1, ((1, 1), (1, 1))), ((8, 6), 1, 1, ((0, 0), (0, 0))),
              ((8, 8), 3, 2, ((0, 1), (0, 1))), ((9, 7), 3, 2, ((1, 1), (1, 1)))]


@pytest.mark.parametrize("size,k,stride,padding", CONV_CASES)
def test_conv_with_a_pre_flipped_kernel_has_autodiffs_gradients(size, k, stride, padding):
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (2, *size, 6))
    kernel = jax.random.normal(keys[1], (k, k, 6, 5)) / k
    flipped = custom_grads.flip_for_input_gradient(kernel)
    strides = (stride, stride)
    plain = lambda x, w: custom_grads.conv2d_plain(x, w, strides, padding)  # noqa: E731
    ours = lambda x, w: custom_grads.conv2d(x, w, flipped, strides, padding)  # noqa: E731
    weights = jax.random.normal(keys[2], plain(x, kernel).shape)
    _assert_same_values_and_gradients(ours, plain, (x, kernel), weights, 1e-5)


def test_the_flipped_kernel_removes_the_kernel_copies_from_the_compiled_gradient():
    """What the pre-flipped kernel is for: the input gradient's program has no `reverse` left."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 16, 32))
    pads = ((1, 1), (1, 1))

    def hlo(loss, *args):
        return jax.jit(jax.grad(loss)).lower(*args).compile().as_text()

    per_call = hlo(lambda x, w: custom_grads.conv2d_plain(x, w, (1, 1), pads).sum(), x, kernel)
    flipped = custom_grads.flip_for_input_gradient(kernel)
    once = hlo(lambda x, w, f: custom_grads.conv2d(x, w, f, (1, 1), pads).sum(), x, kernel, flipped)
    assert " reverse(" in per_call
    assert " reverse(" not in once


def test_conv_with_a_pre_flipped_kernel_on_a_batch_sharded_mesh_equals_one_device():
    x = jax.random.normal(jax.random.key(2), (8, 8, 8, 16))
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 16, 16)) / 3
    flipped = custom_grads.flip_for_input_gradient(kernel)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    @jax.checkpoint
    def block(x, w, f):
        h = custom_grads.conv2d(x, w, f, (1, 1), ((1, 1), (1, 1)))
        return custom_grads.conv2d(jnp.tanh(h), w, f, (2, 2), ((0, 1), (0, 1)))

    grad = jax.grad(lambda x, w, f: jnp.sin(block(x, w, f)).sum())
    sharded = jax.jit(grad, in_shardings=(batch, replicated, replicated), out_shardings=batch)
    assert "all-gather" not in sharded.lower(x, kernel, flipped).compile().as_text()
    np.testing.assert_allclose(sharded(x, kernel, flipped), jax.jit(grad)(x, kernel, flipped), atol=1e-5, rtol=1e-5)


def test_the_unets_conv_module_is_flaxs_conv_with_the_same_params_and_values():
    """nn_blocks.Conv replaced nn.Conv in the UNet: the same param tree, initial values and outputs
    (so converted checkpoints and seeded inits are unchanged); with the flipped kernels given, the
    same outputs and input gradient."""
    import flax.linen as nn

    from dediffusion_jax.t2i import nn_blocks

    x = jax.random.normal(jax.random.key(4), (2, 9, 9, 8))
    pad = ((0, 1), (0, 1))
    ours = nn_blocks.Conv(16, 3, 2, pad)
    flax_conv = nn.Conv(16, (3, 3), strides=(2, 2), padding=pad)
    params = ours.init(jax.random.key(5), x)
    reference = flax_conv.init(jax.random.key(5), x)
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
    np.testing.assert_allclose(ours.apply(params, x), flax_conv.apply(params, x), atol=1e-6)
    flipped = {**params, nn_blocks.INPUT_GRAD_KERNELS: nn_blocks.input_gradient_kernels(params["params"])}
    assert flipped[nn_blocks.INPUT_GRAD_KERNELS]["kernel"].shape == (3, 3, 16, 8)
    grad = lambda variables: jax.grad(lambda x: jnp.sin(ours.apply(variables, x)).sum())(x)  # noqa: E731
    np.testing.assert_allclose(grad(flipped), grad(params), atol=1e-6)


def test_a_rematerialised_unet_reads_the_flipped_kernels_too():
    """configs/paper.py sets remat: nn.remat must hand the collection to the blocks it wraps, or the
    flipped kernels would be ignored (the same numbers, only slower). Same text gradient, no `reverse`."""
    from bench.unet_cpu import random_unet
    from dediffusion_jax.t2i import nn_blocks
    from dediffusion_jax.t2i.unet import UNet2DConditionModel

    config, _, params, (sample, steps, text, weight) = random_unet("tiny", 2)
    model = UNet2DConditionModel(config, remat=True)
    flipped = {"params": params, nn_blocks.INPUT_GRAD_KERNELS: nn_blocks.input_gradient_kernels(params)}
    grad = jax.jit(jax.grad(lambda c, v: (model.apply(v, sample, steps, c) * weight).sum()))
    np.testing.assert_allclose(grad(text, flipped), grad(text, {"params": params}), atol=1e-6, rtol=1e-5)
    assert " reverse(" in grad.lower(text, {"params": params}).compile().as_text()
    assert " reverse(" not in grad.lower(text, flipped).compile().as_text()
