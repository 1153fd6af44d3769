"""The world's third-party text-to-image model (projects/miniworld/assets/sd_world): a stock Stable
Diffusion folder that diffusers loads whole, that our Flax pipeline draws identically from the same
noise, and that passes the world's quality gate through diffusers' own pipeline."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from projects.miniworld import scenes, third_party

FOLDER = third_party.SD_WORLD_DIR


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One thread: torch's 2-thread pool slows ~13x when another process holds a core (measured:
    64 prompts x 5 DDIM steps 1.8 s on 1 thread, 24 s on 2, beside one busy process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(str(FOLDER), safety_checker=None, requires_safety_checker=False,
                                                use_safetensors=True, low_cpu_mem_usage=False,
                                                dtype=torch.float32)
    p.scheduler = DDIMScheduler.from_config(p.scheduler.config)
    p.set_progress_bar_config(disable=True)
    return p


def test_diffusers_loads_every_component_with_no_missing_or_unexpected_weights():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
        _, info = cls.from_pretrained(str(FOLDER), subfolder=sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (sub, info)
        assert not info.get("mismatched_keys"), (sub, info)


def test_the_stock_pipeline_loads_the_folder_without_a_warning(caplog):
    """No logged warning and no Python warning (e.g. diffusers' outdated-scheduler-config one).
    low_cpu_mem_usage=False only because `accelerate` is not installed here (diffusers warns then)."""
    import warnings

    import diffusers
    from diffusers import StableDiffusionPipeline

    diffusers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            StableDiffusionPipeline.from_pretrained(str(FOLDER), use_safetensors=True, low_cpu_mem_usage=False)
    finally:
        diffusers.utils.logging.disable_propagation()
    # (transformers says once that torchvision, not installed here, would back its image processors:
    # a note about this machine, not about the folder.)
    logged = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and "requires torchvision" not in r.getMessage()]
    assert logged == [] and [str(w.message)[:200] for w in caught] == []


def test_flax_pipeline_draws_what_diffusers_draws_from_the_same_noise(pipe):
    """The same folder through both pipelines: same prompts, same initial latents, DDIM + guidance."""
    from dediffusion_jax.t2i import pipeline
    from dediffusion_jax.t2i.folder import load_decoder

    decoder = load_decoder(FOLDER)
    prompts = ["red circle top left , blue square bottom right , white background", "green triangle", ""]
    x_T = np.asarray(pipeline.initial_noise(decoder, 7, np.arange(len(prompts))))  # NHWC latents
    with torch.no_grad():
        ours_in_torch = pipe(prompts, num_inference_steps=8, guidance_scale=3.0, output_type="np",
                             latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())).images
    ids = pipeline.tokenize(decoder, prompts)
    empty = np.broadcast_to(pipeline.tokenize(decoder, [""])[0], ids.shape)
    flax = pipeline.sample_from_states(
        decoder.spec, decoder.params, pipeline.text_states(decoder.spec, decoder.params, ids),
        pipeline.text_states(decoder.spec, decoder.params, np.asarray(empty)), x_T,
        num_steps=8, guidance_scale=3.0)
    flax01 = np.clip((np.asarray(flax) + 1.0) / 2.0, 0.0, 1.0)
    assert flax01.shape == ours_in_torch.shape == (3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3)
    np.testing.assert_allclose(flax01, ours_in_torch, atol=2e-3)


def test_gate_through_diffusers_on_held_out_scenes():
    """A short version of the quality gate (assets/sd_world/README.md has the full one): 64 held-out
    scenes drawn by diffusers' pipeline from their FULL captions at the folder's gate guidance."""
    gate = third_party.gate_through_diffusers(FOLDER, num_scenes=64, num_steps=15)
    assert gate["background"] >= 0.95 and gate["occupancy"] >= 0.9, gate
    assert gate["colour"] >= 0.8 and gate["shape"] >= 0.8, gate
    assert gate["short_caption_object"] >= 0.9, gate
