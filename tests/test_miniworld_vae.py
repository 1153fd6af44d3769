"""The world's AutoencoderKL (projects/miniworld/pretrain_vae.py): trains on the spine, exports a
diffusers folder that diffusers loads whole and that computes what our Flax VAE computes, and the
committed one reconstructs held-out scenes well enough for the classifier to read them."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dediffusion_jax.t2i import vae
from projects.miniworld import pretrain_vae, scenes


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    assert pretrain_vae.main(["--workdir", str(root / "w"), "--out", str(root / "out"), "--steps", "3",
                              "--batch", "8", "--log-every", "1"]) == 0
    return root


@pytest.mark.slow  # a training run + export (about a minute of compiling on 2 cores)
def test_a_short_run_exports_a_folder_with_its_scaling_factor(exported):
    config = json.loads((exported / "out" / "config.json").read_text())
    info = json.loads((exported / "out" / "TRAINING.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["latent_channels"] == 4
    assert config["scaling_factor"] == info["scaling_factor"] > 0
    assert set(info["reconstruction_heldout"]) >= {"psnr_db", "object", "occupancy"}


@pytest.mark.slow
def test_an_exported_folder_loads_in_diffusers_whole(exported):
    from diffusers import AutoencoderKL

    _, info = AutoencoderKL.from_pretrained(str(exported / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_diffusers_decodes_what_flax_decodes():
    """The committed VAE (float16 weights, computed in float32 on both sides)."""
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_pretrained(str(pretrain_vae.DEFAULT_DIR), dtype=torch.float32)
    config, params = pretrain_vae.load_vae()
    images = scenes.images_of(scenes.evaluation_indices(4))
    ours = np.asarray(vae.AutoencoderKL(config).apply({"params": params}, jnp.asarray(images)))
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        theirs = model.decode(model.encode(x).latent_dist.mean).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_the_committed_vae_reconstructs_held_out_scenes():
    """(The committed copy is the latent decoder's vae/ component, float16.)"""
    info = json.loads((pretrain_vae.DEFAULT_DIR / "TRAINING.json").read_text())["reconstruction_heldout"]
    assert info["scenes"] == 364 and info["object"] >= 0.99 and info["background"] == 1.0, info
    config, params = pretrain_vae.load_vae()
    quality = pretrain_vae.reconstruction_quality(params, config, num_scenes=64)
    assert quality["object"] >= 0.99 and quality["psnr_db"] >= 25, quality
