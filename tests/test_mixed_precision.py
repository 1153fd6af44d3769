"""The run's compute dtype and remat reach the frozen decoder (text encoder, UNet, VAE), not only the
encoder: bfloat16 agrees with float32 within a stated tolerance, params and gradients stay float32,
and remat lowers the step's temporary memory (XLA's memory analysis, abstract, on CPU)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dediffusion_jax.models import build
from helpers import tiny_decoder as tiny
from projects.miniworld import tokenizer as world_tokenizer

BATCH = 4
IMAGE = 16


def config(dtype: str, remat: bool = False) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "backbone": {"variant": "Ti/4", "image_size": IMAGE, "init": "", "frozen": False,
                     "overrides": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64}},
        "encoder": {"num_queries": 6, "pooler_blocks": 1, "pooler_width": 32, "pooler_heads": 2},
        "vocab": {"exclude_punctuation": True, "exclude_tokens": []},
        "quantizer": {"hard": True, "token_path": "fused"},
        "total_steps": 100, "dtype": dtype, "remat": remat})


@pytest.fixture(scope="module")
def decoder():
    return tiny.random_decoder("sd2", world_tokenizer.DEFAULT_DIR, seed=0)  # text encoder + UNet + VAE


def test_float32_without_remat_keeps_the_loaded_spec(decoder):
    model, _, _ = build.build_model(config("float32"), decoder.spec)
    assert model.decoder is decoder.spec  # same object: the same compiled programs as before


def test_the_decoder_modules_compute_in_the_runs_dtype(decoder):
    model, _, _ = build.build_model(config("bfloat16", remat=True), decoder.spec)
    spec = model.decoder
    assert spec is not decoder.spec and spec.tokenizer is decoder.spec.tokenizer
    assert jnp.dtype(spec.dtype) == jnp.bfloat16 and spec.remat
    assert spec.unet.dtype == jnp.bfloat16 and spec.unet.remat
    assert spec.text_encoder.dtype == jnp.bfloat16 and spec.text_encoder.remat
    assert spec.vae.dtype == jnp.bfloat16
    assert jnp.dtype(decoder.spec.dtype) == jnp.float32 and not decoder.spec.remat  # the loaded one


def test_bfloat16_loss_and_gradients_agree_with_float32(decoder):
    """Same params (float32), same batch and rng; only config.dtype differs, so the ViT, pooler,
    vocabulary head, CLIP text encoder, VAE encode and UNet all compute in bfloat16.

    Measured on this tiny sd2-family decoder (2026-12-05, CPU, batch 4): loss relative difference
    1.0e-2, gradient relative difference (global L2 over all encoder leaves) 0.32, cosine 0.962
    (at batch 8: 5.4e-3 and 0.33 with hard tokens, 1.5e-3 and 0.16 with soft ones). bfloat16 keeps 8 bits of mantissa (relative rounding 3.9e-3 per op), and the
    gradient reaches the encoder through the whole UNet and text encoder backward, so a few tens of
    percent on a random-weight network is bf16 noise, not a wrong path: the gradients still point the
    same way (cosine similarity asserted). Tolerances: 3e-2 on the loss, 0.6 relative / cosine > 0.8
    on the gradient; a dtype bug (a module silently left out, a float32 param cast wrong) shows as
    the assertion on the gradients' dtype or as a much larger difference.
    """
    rng = np.random.default_rng(0)
    size = decoder.spec.image_size
    batch = {"backbone": rng.uniform(-1, 1, (BATCH, IMAGE, IMAGE, 3)).astype(np.float32),
             "decoder": rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32)}
    frozen = {"decoder": decoder.params}
    results = {}
    for dtype in ("float32", "bfloat16"):
        model, init_params, _ = build.build_model(config(dtype), decoder.spec)
        params = jax.jit(init_params)(jax.random.key(1))
        fn = jax.jit(jax.value_and_grad(
            lambda p: model.loss(p, frozen, batch, jax.random.key(2), jnp.float32(1.0))[0]))
        results[dtype] = fn(params)
    (l32, g32), (l16, g16) = results["float32"], results["bfloat16"]
    assert {x.dtype for x in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}  # params stay float32
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g32)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g16)])
    loss_rel = abs(float(l16) - float(l32)) / abs(float(l32))
    grad_rel = float(np.linalg.norm(b - a) / np.linalg.norm(a))
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    print(f"bf16 vs fp32: loss rel {loss_rel:.2e}, grad rel {grad_rel:.3f}, cosine {cosine:.4f}")
    assert np.isfinite(float(l16)) and loss_rel < 3e-2
    assert grad_rel < 0.6 and cosine > 0.8
    assert grad_rel > 0  # bf16 really ran somewhere


def residual_bytes(decoder, remat: bool, sample_size: int = 16, batch: int = 8) -> int:
    """Bytes the backward of the loss keeps from the forward (the residuals of jax.vjp w.r.t. the
    trainable params, read abstractly with eval_shape: nothing runs), at `sample_size` latents."""
    spec = dataclasses.replace(
        decoder.spec, unet_config=dataclasses.replace(decoder.spec.unet_config, sample_size=sample_size))
    model, init_params, _ = build.build_model(config("float32", remat=remat), spec)
    params = jax.eval_shape(init_params, jax.random.key(0))
    frozen = {"decoder": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), decoder.params)}
    batch = {"backbone": jax.ShapeDtypeStruct((batch, IMAGE, IMAGE, 3), jnp.float32),
             "latents": jax.ShapeDtypeStruct((batch, sample_size, sample_size, 4), jnp.float32)}

    def pullback(p, f, b, k):
        return jax.vjp(lambda p: model.loss(p, f, b, k, jnp.float32(1.0))[0], p)[1]

    residuals = jax.tree.leaves(jax.eval_shape(pullback, params, frozen, batch, jax.random.key(0)))
    return sum(int(np.prod(r.shape)) * r.dtype.itemsize for r in residuals
               if not jnp.issubdtype(r.dtype, jax.dtypes.prng_key))  # (the rng: no bytes to speak of)


def test_remat_lowers_the_activation_memory_of_the_step(decoder):
    """Measured (2026-12-05, CPU, batch 8 at 16x16x4 latents, the tiny sd2 UNet + text encoder +
    ViT): 57.7 MB kept for the backward without remat, 4.2 MB with it (13.7x less).

    XLA:CPU's memory_analysis().temp_size_in_bytes of the same jitted gradient does NOT move with
    remat (measured: 67.2 MB vs 66.9 MB at this shape, 708 vs 709 MB at 32x32 latents; UNet alone
    274 vs 273 MB): its CPU schedule keeps about as much alive either way (attention probabilities
    dominate its peak), so the residuals that JAX hands to the backward are the abstract measure
    used here; the device figure is bench/throughput.py's peak memory with --remat both.
    """
    without, with_remat = residual_bytes(decoder, False), residual_bytes(decoder, True)
    print(f"residual bytes: {without} without remat, {with_remat} with remat")
    assert with_remat < 0.3 * without
