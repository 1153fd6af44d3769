"""The De-Diffusion train step: gradient path, hard tokens, masking, frozen decoder, sharding, learning.

All on a tiny random pixel decoder with the miniature world's tokenizer, and a tiny ViT encoder.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from projects.miniworld import tokenizer as world_tokenizer
from dediffusion_jax.models import quantizer
from dediffusion_jax.parallel import sharding as sharding_lib
from dediffusion_jax.parallel.mesh import make_mesh
from dediffusion_jax.t2i import clip_text
from dediffusion_jax.models import build
from dediffusion_jax.train import builders, step as step_lib
from helpers import tiny_decoder as tiny

BATCH = 8
IMAGE = 16


def tiny_config(token_path: str = "fused", hard: bool = True) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "backbone": {
                "variant": "Ti/4",
                "image_size": IMAGE,
                "init": "",
                "frozen": False,
                "overrides": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64},
            },
            "encoder": {"num_queries": 6, "pooler_blocks": 1, "pooler_width": 32, "pooler_heads": 2},
            "vocab": {"exclude_punctuation": True, "exclude_tokens": []},
            "quantizer": {
                "hard": hard,
                "token_path": token_path,
                "temperature": {"schedule": "exponential", "start": 2.0, "end": 0.3},
            },
            "total_steps": 100,
            "dtype": "float32",
        }
    )


@pytest.fixture(scope="module")
def decoder():
    return tiny.random_decoder("pixel", world_tokenizer.DEFAULT_DIR, seed=0)


@pytest.fixture(scope="module")
def built(decoder):
    model, init_params, _ = build.build_model(tiny_config(), decoder.spec)
    params = jax.jit(init_params)(jax.random.key(1))
    frozen = {"decoder": decoder.params}
    return model, params, frozen


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
    return {"backbone": images, "decoder": images}


@pytest.mark.slow  # ~30-70 s on 2 cores: .ci/run's slow phase keeps the default run under 20 min
def test_gradient_reaches_pooler_and_head_through_the_embedding_matrix(built):
    model, params, frozen = built
    batch = make_batch()
    rng, temp = jax.random.key(2), jnp.float32(1.0)

    def loss_of(params, frozen):
        return model.loss(params, frozen, batch, rng, temp)[0]

    g_enc, g_frozen = jax.grad(loss_of, argnums=(0, 1))(params, frozen)
    for part in ("pooler", "vocab_head"):
        norm = optax.tree.norm(g_enc[part])
        assert np.isfinite(norm) and norm > 0, part
    # The decoder's token-embedding matrix E receives gradient: the path runs through soft @ E ...
    g_table = clip_text.token_embedding_matrix(g_frozen["decoder"]["text_encoder"])
    assert float(jnp.abs(g_table).sum()) > 0
    # ... and it is the ONLY path: with E = 0 the tokens carry nothing and the head gets no gradient.
    zeroed = copy.deepcopy(jax.tree.map(np.asarray, frozen))
    zeroed["decoder"]["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"][:] = 0
    g_zero = jax.grad(loss_of)(params, zeroed)
    assert float(optax.tree.norm(g_zero["vocab_head"])) == 0.0


def test_hard_tokens_equal_the_text_encoder_on_the_argmax_ids(built, decoder):
    model, params, frozen = built
    images = jnp.asarray(make_batch()["backbone"])
    rng, temp = jax.random.key(3), jnp.float32(0.7)
    states, _ = model.text_states(params, frozen, images, rng, temp)
    logits = model.logits(params, frozen, images)
    ids = jnp.argmax(logits + quantizer.gumbel_noise(rng, logits.shape), axis=-1)
    reference = decoder.text_encoder.apply(
        {"params": decoder.params["text_encoder"]}, input_ids=model.prompt_ids(ids)
    ).last_hidden_state
    np.testing.assert_allclose(states, reference, atol=1e-5)
    # The prompt layout is the tokenizer's own: SOS, tokens, EOS, padding.
    text = model.texts(ids[:1])[0]
    assert isinstance(text, str)


@pytest.mark.slow  # the default run stayed over 20 min on a slower 2-core machine (2026-12-07): .ci/run's slow phase runs it
def test_fused_and_soft_token_paths_agree(decoder):
    batch = make_batch()
    rng, temp = jax.random.key(4), jnp.float32(1.3)
    results = []
    for path in ("fused", "soft"):
        model, init_params, _ = build.build_model(tiny_config(token_path=path, hard=False), decoder.spec)
        params = init_params(jax.random.key(1))
        loss, grads = jax.value_and_grad(lambda p: model.loss(p, {"decoder": decoder.params}, batch, rng, temp)[0])(params)
        results.append((loss, grads))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_masked_tokens_are_never_chosen(built, decoder):
    model, params, frozen = built
    excluded = set(model.encoder.config.excluded_ids)
    vocab = decoder.tokenizer.get_vocab()
    marks = {vocab[p + "</w>"] for p in world_tokenizer.PUNCTUATION if p + "</w>" in vocab}
    assert marks and marks <= excluded
    assert {decoder.tokenizer.bos_token_id, decoder.tokenizer.eos_token_id} <= excluded
    images = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (64, IMAGE, IMAGE, 3)), jnp.float32)
    logits = model.logits(params, frozen, images)
    chosen = set(np.asarray(quantizer.argmax_tokens(logits)).ravel().tolist())
    sampled = jnp.argmax(logits + quantizer.gumbel_noise(jax.random.key(0), logits.shape), -1)
    chosen |= set(np.asarray(sampled).ravel().tolist())
    assert not chosen & excluded


def born_sharded_state(init_params, optimizer, mesh, rng=None):
    """The train state as the loop makes it: eval_shape -> state_shardings_for -> jit(init, out_shardings)."""
    rng = jax.random.key(1) if rng is None else rng

    def init(key):
        params = init_params(key)
        return step_lib.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    state_sh = step_lib.state_shardings_for(jax.eval_shape(init, rng), mesh, sharding_lib.ENCODER_RULES)
    return jax.jit(init, out_shardings=state_sh)(rng), state_sh


def _run_steps(model, init_params, frozen_params, mesh, num_steps=3, lr=1e-3):
    optimizer = optax.adam(lr)
    state, state_sh = born_sharded_state(init_params, optimizer, mesh)
    frozen_sh = sharding_lib.tree_shardings(frozen_params, mesh, sharding_lib.FROZEN_REPLICATED)
    frozen = jax.device_put(frozen_params, frozen_sh)
    step_fn = step_lib.make_step_fn(
        model, optimizer, lambda s: jnp.float32(lr), builders.build_temperature_fn(tiny_config())
    )
    fns = step_lib.compile_step(
        step_fn, state, state_sh, frozen, frozen_sh, make_batch(), mesh, jax.random.key(9)
    )
    losses = []
    for i in range(num_steps):
        batch = jax.device_put(make_batch(i), fns.batch_sharding)
        state, metrics = fns.step(state, frozen, batch, jax.random.key(9))
        losses.append(float(metrics["loss"]))
    return state, losses, metrics, frozen


def test_frozen_decoder_is_bit_identical_after_steps(built, decoder):
    model, _, _ = built
    _, init_params, _ = build.build_model(tiny_config(), decoder.spec)
    before = jax.tree.map(np.array, {"decoder": decoder.params})
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    state, losses, metrics, frozen_after = _run_steps(model, init_params, {"decoder": decoder.params}, mesh)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(frozen_after)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert int(state.step) == 3
    for key in ("loss", "temperature", "learning_rate", "grad_norm", "param_norm",
                "token_entropy", "distinct_tokens"):
        assert np.isfinite(float(metrics[key])), key
    assert 0 < int(metrics["distinct_tokens"]) <= 6 * BATCH


@pytest.mark.parametrize("axes", [{"data": 8},  # the other two meshes: slow phase (the default run's 20 min)
                                  pytest.param({"data": 4, "fsdp": 2}, marks=pytest.mark.slow),
                                  pytest.param({"data": 2, "tensor": 4}, marks=pytest.mark.slow)])
def test_sharded_steps_match_one_device(built, decoder, axes):
    model, _, _ = built
    _, init_params, _ = build.build_model(tiny_config(), decoder.spec)
    frozen = {"decoder": decoder.params}
    single, losses1, _, _ = _run_steps(
        model, init_params, frozen, make_mesh({"data": 1}, devices=jax.devices()[:1])
    )
    sharded, losses8, _, _ = _run_steps(model, init_params, frozen, make_mesh(axes))
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    # atol: attention key biases have an exactly-zero true gradient (softmax ignores a shift shared by
    # all keys); Adam turns their rounding noise into ~1e-5 steps that differ between layouts.
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


@pytest.mark.slow  # the default run stayed over 20 min on a slower 2-core machine (2026-12-07): .ci/run's slow phase runs it
def test_logged_flops_count_the_vocabulary_heads_loop_per_iteration(built, decoder):
    """Issue 21: XLA counts a loop body once, so its figure for a chunked fused vocabulary head drops
    with the chunk size; compile_step's flops_per_step (what the trainer logs as TFLOP/s) does not.
    2 devices, 8 images x 6 queries = 24 rows per device: in one chunk, and in chunks of 4 (the op's
    own tests: tests/test_vocab_head_chunks.py)."""
    model, _, _ = built
    _, init_params, _ = build.build_model(tiny_config(), decoder.spec)
    axes = {"data": 2}
    mesh = make_mesh(axes, devices=jax.devices()[:2])
    optimizer = optax.adam(1e-3)
    state, state_sh = born_sharded_state(init_params, optimizer, mesh)
    frozen = {"decoder": decoder.params}
    frozen_sh = sharding_lib.tree_shardings(frozen, mesh, sharding_lib.FROZEN_REPLICATED)
    fns = {}
    for rows in (48 // axes["data"], 4):
        chunked = dataclasses.replace(model, rows_per_chunk=rows, batch_shards=axes["data"])
        step_fn = step_lib.make_step_fn(chunked, optimizer, lambda s: 1e-3, lambda s: jnp.float32(1.0))
        fns[rows] = step_lib.compile_step(step_fn, state, state_sh, frozen, frozen_sh, make_batch(), mesh,
                                          jax.random.key(5))
    whole, chunked = fns.values()
    assert whole.flops_per_step == whole.xla_flops_per_step  # no loop
    assert chunked.xla_flops_per_step < whole.xla_flops_per_step - 1e6  # XLA alone misses ~5 chunks
    assert chunked.flops_per_step == pytest.approx(whole.flops_per_step, rel=0.01)


def test_loss_falls_on_a_fixed_batch(built, decoder):
    """Overfitting one batch: the encoder learns texts that lower the frozen decoder's loss.

    With this RANDOM tiny decoder the words can only explain a little of the noise images (measured:
    0.930 -> 0.889 mean loss over the first/last 10 of 150 steps); the miniature world's trained
    decoder shows the real effect (docs/miniworld.md).
    """
    model, init_params, _ = build.build_model(tiny_config(), decoder.spec)
    optimizer = optax.adam(1e-2)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    state, state_sh = born_sharded_state(init_params, optimizer, mesh)
    frozen = {"decoder": decoder.params}
    frozen_sh = sharding_lib.tree_shardings(frozen, mesh, sharding_lib.FROZEN_REPLICATED)
    # Fixed timesteps/noise: the same rng every step (fold_in uses the step, so pin the step too).
    step_fn = step_lib.make_step_fn(model, optimizer, lambda s: 1e-2, lambda s: jnp.float32(1.0))

    def fixed(state, frozen, batch, rng):
        new, m = step_fn(state.replace(step=jnp.zeros((), jnp.int32)), frozen, batch, rng)
        return new.replace(step=state.step + 1), m

    fns = step_lib.compile_step(fixed, state, state_sh, frozen, frozen_sh, make_batch(), mesh, jax.random.key(5))
    batch = jax.device_put(make_batch(), fns.batch_sharding)
    losses = []
    for _ in range(150):
        state, m = fns.step(state, frozen, batch, jax.random.key(5))
        losses.append(float(m["loss"]))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"fixed-batch loss: first 10 steps {first:.4f} -> last 10 steps {last:.4f}")
    assert last < 0.97 * first


def test_slot_usage_entropy_spans_constant_to_uniform_words(built):
    """0 when every image gets the same word in every slot, 1 when the vocabulary is used uniformly."""
    model, params, _ = built
    width = params["vocab_head"]["dense"]["kernel"].shape[0]
    head = {"kernel": jnp.zeros((width, model.encoder.config.vocab_size)),
            "bias": jnp.zeros((model.encoder.config.vocab_size,))}
    features = jnp.ones((BATCH, model.num_tokens, width))
    uniform = {**params, "vocab_head": {"dense": head}}
    assert float(model.slot_usage_entropy(uniform, features)) == pytest.approx(1.0, abs=1e-5)
    allowed = np.flatnonzero(~model.exclusion_mask)
    peaked = {**params, "vocab_head": {"dense": {**head, "bias": head["bias"].at[allowed[3]].set(100.0)}}}
    assert float(model.slot_usage_entropy(peaked, features)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow  # the default run stayed over 20 min on a slower 2-core machine (2026-12-07): .ci/run's slow phase runs it
def test_diversity_weight_adds_the_term_and_its_gradient_is_finite(decoder):
    config = tiny_config()
    config.quantizer.diversity_weight = 0.5
    model, init_params, _ = build.build_model(config, decoder.spec)
    params = jax.jit(init_params)(jax.random.key(1))
    frozen, batch, rng = {"decoder": decoder.params}, make_batch(), jax.random.key(2)
    (loss, aux), grads = jax.value_and_grad(model.loss, has_aux=True)(
        params, frozen, batch, rng, jnp.float32(1.0))
    assert 0.0 < float(aux["slot_usage_entropy"]) < 1.0
    np.testing.assert_allclose(loss, aux["denoising_loss"] + 0.5 * (1 - aux["slot_usage_entropy"]), rtol=1e-6)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    plain, _ = build.build_model(tiny_config(), decoder.spec)[:2]
    np.testing.assert_allclose(plain.loss(params, frozen, batch, rng, jnp.float32(1.0))[0],
                               aux["denoising_loss"], rtol=1e-6)


def test_loss_timestep_range_selects_the_noise_levels(decoder):
    """config.loss.timestep_range restricts t. The fresh tiny UNet's output is small, so its v-MSE is
    about E[v^2]: v = eps (variance 1) at t ~ 0 but v = -x0 (variance 1/3 for these uniform images) at
    t ~ 999, so the two ranges give clearly different losses. An empty range fails at build time."""
    losses = {}
    for name, fractions in {"clean": (0.0, 0.01), "noisy": (0.999, 1.0)}.items():
        config = tiny_config()
        config.loss = ml_collections.ConfigDict(dict(timestep_range=fractions))
        model, init_params, _ = build.build_model(config, decoder.spec)
        assert model.timestep_range == fractions
        params = jax.jit(init_params)(jax.random.key(1))
        losses[name] = float(model.loss(params, {"decoder": decoder.params}, make_batch(),
                                        jax.random.key(2), jnp.float32(1.0))[0])
    assert losses["clean"] > 1.5 * losses["noisy"]
    config = tiny_config()
    config.loss = ml_collections.ConfigDict(dict(timestep_range=(0.6, 0.4)))
    with pytest.raises(ValueError, match="timestep fraction range"):
        build.build_model(config, decoder.spec)


def test_a_timestep_curriculum_moves_the_noise_levels_over_training(decoder):
    """loss.timestep_range_final slides the window over timestep_ramp_fraction of total_steps: at
    step 0 the loss is the start range's, from the end of the ramp on it is the final range's (same
    rng, so exactly equal)."""

    def model_with(**loss):
        config = tiny_config()
        config.loss = ml_collections.ConfigDict(loss)
        return build.build_model(config, decoder.spec)[:2]

    moving, init_params = model_with(timestep_range=(0.999, 1.0), timestep_range_final=(0.0, 0.01),
                                     timestep_ramp_fraction=0.5)
    assert moving.timestep_ramp_steps == 50  # half of total_steps = 100
    noisy, _ = model_with(timestep_range=(0.999, 1.0))
    clean, _ = model_with(timestep_range=(0.0, 0.01))
    params = jax.jit(init_params)(jax.random.key(1))
    frozen, batch, rng = {"decoder": decoder.params}, make_batch(), jax.random.key(2)

    def loss(model, step=0):
        return float(model.loss(params, frozen, batch, rng, jnp.float32(1.0), step)[0])

    assert loss(moving, 0) == loss(noisy)
    assert loss(moving, 50) == loss(moving, 99) == loss(clean)
    assert loss(clean) > 1.5 * loss(noisy)  # the two ends really differ (see the test above)
    with pytest.raises(ValueError, match="timestep_ramp_fraction"):
        model_with(timestep_range=(0.8, 1.0), timestep_range_final=(0.5, 0.9), timestep_ramp_fraction=0)


def test_log_mean_reduction_averages_log_errors_and_keeps_the_plain_loss_as_a_metric(decoder):
    """loss.reduction="log_mean": the objective is the mean of the per-example log MSE, so by Jensen
    it is at most the log of the plain mean; the denoising_loss metric stays the plain mean."""

    def model_with(**loss):
        config = tiny_config()
        config.loss = ml_collections.ConfigDict(loss)
        return build.build_model(config, decoder.spec)[:2]

    plain, init_params = model_with(timestep_range=(0.0, 1.0))
    logged, _ = model_with(timestep_range=(0.0, 1.0), reduction="log_mean")
    params = jax.jit(init_params)(jax.random.key(1))
    frozen, batch, rng = {"decoder": decoder.params}, make_batch(), jax.random.key(2)
    mean_loss, aux = plain.loss(params, frozen, batch, rng, jnp.float32(1.0))
    log_loss, log_aux = logged.loss(params, frozen, batch, rng, jnp.float32(1.0))
    np.testing.assert_allclose(log_aux["denoising_loss"], aux["denoising_loss"], rtol=1e-6)
    assert float(log_loss) < float(np.log(mean_loss))  # t differs per example: the MSEs differ
    grads = jax.grad(lambda p: logged.loss(p, frozen, batch, rng, jnp.float32(1.0))[0])(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="loss.reduction"):
        model_with(timestep_range=(0.0, 1.0), reduction="median")


def test_sharded_steps_with_the_diversity_term_match_one_device(decoder):
    """The diversity term averages over the whole (sharded) batch: 4 x 2 devices must agree with one."""
    config = tiny_config()
    config.quantizer.diversity_weight = 0.1
    model, init_params, _ = build.build_model(config, decoder.spec)
    frozen = {"decoder": decoder.params}
    single, losses1, m1, _ = _run_steps(model, init_params, frozen,
                                        make_mesh({"data": 1}, devices=jax.devices()[:1]))
    sharded, losses8, m8, _ = _run_steps(model, init_params, frozen, make_mesh({"data": 4, "fsdp": 2}))
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    np.testing.assert_allclose(float(m8["slot_usage_entropy"]), float(m1["slot_usage_entropy"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


def test_the_unets_kernels_flipped_once_give_the_same_loss_and_encoder_gradient(built):
    """config.decoder.flip_conv_kernels: the trainer hands the step the UNet's kernels pre-flipped
    (on CPU by default); the loss and the encoder's gradient are the ones of the plain UNet."""
    model, params, frozen = built
    batch, rng, temp = make_batch(), jax.random.key(5), jnp.float32(1.0)
    config = tiny_config()
    config.decoder = {"flip_conv_kernels": "auto"}
    extra = build.frozen_unet_input_grad_kernels(config, frozen["decoder"]["unet"])
    assert list(extra) == [build.UNET_INPUT_GRAD_KERNELS]  # auto: on, these are CPU devices
    flipped = {"decoder": {**frozen["decoder"], **extra}}
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, f: model.loss(p, f, batch, rng, temp)[0]))
    loss, grads = value_and_grad(params, frozen)
    loss_flipped, grads_flipped = value_and_grad(params, flipped)
    np.testing.assert_allclose(loss_flipped, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_flipped), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    config.decoder.flip_conv_kernels = "off"
    assert build.frozen_unet_input_grad_kernels(config, frozen["decoder"]["unet"]) == {}
    config.decoder.flip_conv_kernels = "always"
    with pytest.raises(ValueError, match="flip_conv_kernels='always'; choose one of auto, on, off"):
        build.frozen_unet_input_grad_kernels(config, frozen["decoder"]["unet"])
