"""Text -> images with the Flax pipeline: parity with diffusers' StableDiffusionPipeline, and generate().

Parity: a tiny SD 1.x-style folder (epsilon, conv projections) and an SD 2.x-style one (v-prediction,
linear projections, upcast attention) are written by torch `save_pretrained`; diffusers'
StableDiffusionPipeline (DDIM, classifier-free guidance, VAE decode) and our jitted sampler start
from the same latents and must draw the same images. generate() is then checked for what callers rely
on: seeds, batch-size and mesh independence, and its uint8 output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.miniworld.tokenizer import DEFAULT_DIR as TOKENIZER_DIR
from dediffusion_jax.parallel.mesh import make_mesh
from dediffusion_jax.t2i import pipeline
from dediffusion_jax.t2i.folder import load_decoder
from helpers import tiny_decoder as tiny

PROMPTS = ["a red circle", "two blue squares on the left"]
STEPS = 4
GUIDANCE = 3.0


# ------------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def reference(request, tmp_path_factory):
    """(diffusers StableDiffusionPipeline, our Decoder) over one torch-written folder."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.set_num_threads(1)  # a training job shares the 2 cores
    root = tmp_path_factory.mktemp(f"pipe_{request.param}")
    tiny.write_reference_folder(request.param, root, TOKENIZER_DIR, seed=3)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(root), safety_checker=None, requires_safety_checker=False, feature_extractor=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_decoder(root)


def _diffusers_images(pipe, prompts, latents_nhwc, guidance_scale, steps=STEPS) -> np.ndarray:
    import torch

    latents = torch.from_numpy(np.asarray(latents_nhwc).transpose(0, 3, 1, 2).copy())
    out = pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents,
        output_type="np",
    )
    return out.images  # [B, H, W, 3] in [0, 1]: (x / 2 + 0.5).clamp(0, 1) of the VAE output


@pytest.mark.parity
@pytest.mark.parametrize("guidance_scale", [GUIDANCE, 1.0])
def test_same_images_as_diffusers_from_the_same_latents(reference, guidance_scale):
    pipe, decoder = reference
    x_T = np.random.default_rng(0).standard_normal((2, *decoder.sample_shape), np.float32)
    want = _diffusers_images(pipe, PROMPTS, x_T, guidance_scale)

    cond = pipeline.text_states(decoder, decoder.params, pipeline.tokenize(decoder, PROMPTS))
    uncond = pipeline.text_states(decoder, decoder.params, pipeline.tokenize(decoder, ["", ""]))
    sample = jax.jit(
        lambda p, c, u, x: pipeline.sample_from_states(
            decoder, p, c, u, x, num_steps=STEPS, guidance_scale=guidance_scale
        )
    )
    ours = np.asarray(sample(decoder.params, cond, uncond, jnp.asarray(x_T)))  # [-1, 1]
    got = np.clip(ours / 2 + 0.5, 0.0, 1.0)

    assert got.shape == want.shape == (2, 16, 16, 3)
    inside = np.mean((want > 0) & (want < 1))
    assert inside > 0.5, f"only {inside:.0%} of the reference pixels are unclamped"
    err = float(np.abs(got - want).max())
    print(f"{decoder.schedule.prediction_type} guidance {guidance_scale}: max |ours - diffusers| "
          f"= {err:.2e} in [0, 1] units ({inside:.0%} of pixels unclamped)")
    assert err <= 1e-4


@pytest.mark.parity
def test_generate_matches_diffusers_fed_generate_initial_noise(reference):
    """generate() end to end (tokenize, guidance, DDIM, VAE, uint8) against diffusers."""
    pipe, decoder = reference
    got = pipeline.generate(
        decoder, PROMPTS, num_steps=STEPS, guidance_scale=GUIDANCE, seed=7, batch_size=2
    )
    x_T = pipeline.initial_noise(decoder, 7, np.arange(len(PROMPTS)))
    want = np.round(_diffusers_images(pipe, PROMPTS, x_T, GUIDANCE) * 255).astype(np.uint8)
    assert got.dtype == np.uint8 and got.shape == want.shape == (2, 16, 16, 3)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.99  # rounding ties only


def test_no_prompts_give_an_empty_batch_of_image_shape(reference):
    _, decoder = reference
    images = pipeline.generate(decoder, [], num_steps=2)
    assert images.shape == (0, 16, 16, 3) and images.dtype == np.uint8  # pixels, not latents


# ------------------------------------------------------------------------------------------------
# generate(): seeds, batching, meshes


FIVE = ["a red circle", "a blue square", "two green triangles", "a dog", "a small cat"]


@pytest.fixture(scope="module")
def pixel():
    return tiny.random_decoder("pixel", TOKENIZER_DIR, seed=0)


@pytest.fixture(scope="module")
def baseline(pixel):
    """5 prompts, batch 4 (a full batch and a padded one), one device."""
    return pipeline.generate(pixel, FIVE, num_steps=2, guidance_scale=GUIDANCE, seed=0, batch_size=4)


def test_output_is_uint8_images(pixel, baseline):
    assert baseline.dtype == np.uint8
    assert baseline.shape == (5, pixel.image_size, pixel.image_size, 3) == (5, 16, 16, 3)
    assert len({im.tobytes() for im in baseline}) == 5  # each example its own noise
    assert baseline.std() > 10


def test_deterministic_for_a_seed_and_different_for_another(pixel, baseline):
    again = pipeline.generate(pixel, FIVE, num_steps=2, guidance_scale=GUIDANCE, seed=0,
                              batch_size=4)
    np.testing.assert_array_equal(again, baseline)
    other = pipeline.generate(pixel, FIVE, num_steps=2, guidance_scale=GUIDANCE, seed=1,
                              batch_size=4)
    assert np.mean(other != baseline) > 0.5


def test_independent_of_batch_size(pixel, baseline):
    single = pipeline.generate(pixel, FIVE, num_steps=2, guidance_scale=GUIDANCE, seed=0,
                               batch_size=1)
    diff = np.abs(single.astype(int) - baseline.astype(int))
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.999, diff.max()


def test_same_on_a_mesh_of_8_devices(pixel, baseline):
    mesh = make_mesh({"data": -1})
    assert mesh.shape["data"] == 8 == jax.device_count()
    sharded = pipeline.generate(pixel, FIVE, num_steps=2, guidance_scale=GUIDANCE, seed=0,
                                batch_size=4, mesh=mesh)  # batch rounded up to 8, 3 padding rows
    diff = np.abs(sharded.astype(int) - baseline.astype(int))
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.999, diff.max()


def test_guidance_one_runs_the_unguided_path(pixel, baseline):
    plain = pipeline.generate(pixel, FIVE[:2], num_steps=2, guidance_scale=1.0, seed=0)
    assert plain.shape == (2, 16, 16, 3) and plain.dtype == np.uint8
    assert np.mean(plain != baseline[:2]) > 0.1  # guidance 3 changed the images


def test_stochastic_ddim_is_seeded_per_example(pixel, baseline):
    """eta > 0: the variance noise, too, is per example, so batching does not change images."""
    # eta 0.5, not 1: with eta = 1 the pixel schedule's first step (t 999 -> 499) computes
    # sqrt(1 - a_prev - std**2) of about -2e-8 in float32 and every image is NaN (schedules.ddim_step).
    kw = dict(num_steps=2, guidance_scale=GUIDANCE, seed=0, eta=0.5)
    four = pipeline.generate(pixel, FIVE, batch_size=4, **kw)
    one = pipeline.generate(pixel, FIVE, batch_size=1, **kw)
    diff = np.abs(one.astype(int) - four.astype(int))
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.999, diff.max()
    assert np.mean(four != baseline) > 0.1  # the noise did something
    np.testing.assert_array_equal(pipeline.generate(pixel, FIVE[:1], batch_size=4, **kw), four[:1])


def test_soft_one_hot_tokens_give_the_text_states_of_ids(pixel):
    ids = pipeline.tokenize(pixel, FIVE[:3])
    assert ids.shape == (3, 16) and ids.dtype == np.int32
    from_ids = pipeline.text_states(pixel, pixel.params, ids)
    soft = jax.nn.one_hot(ids, pixel.text_config.vocab_size)
    from_soft = pixel.text_encoder.apply(
        {"params": pixel.params["text_encoder"]}, soft_tokens=soft
    ).last_hidden_state
    np.testing.assert_allclose(np.asarray(from_soft), np.asarray(from_ids), atol=1e-5)
