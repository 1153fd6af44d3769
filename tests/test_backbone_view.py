"""The backbone view is normalised as the BACKBONE expects (issue 17 #7): a folder or tfds source of the
world's images gives the world backbone exactly what the miniworld: source gives it."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
from PIL import Image

from dediffusion_jax.data.preprocess import CLIP_MEAN, CLIP_STD
from dediffusion_jax.inference import preprocess_config_for
from dediffusion_jax.models import build
from dediffusion_jax.train import cli, loop
from projects.miniworld import scenes
from projects.miniworld.data_source import MiniWorldViews

REPO = Path(__file__).resolve().parents[1]
WORLD = f"{REPO}/projects/miniworld/configs/world.py"


def world_config(arg: str = "", **overrides):
    config = cli.load_config_file(f"{WORLD}:{arg}" if arg else WORLD)
    config.update_from_flattened_dict(overrides)
    return config


def test_a_folder_source_and_the_miniworld_source_give_the_same_backbone_view(tmp_path):
    indices = scenes.split_indices("heldout")[:4]
    images = scenes.images_of(indices)  # [-1, 1], what MiniWorldViews passes through
    for i, image in zip(indices, images):
        pixels = np.round((image + 1) * 127.5).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{int(i):05d}.png")
    config = world_config(**{"data.source": f"folder:{tmp_path}", "data.shuffle": False,
                             "batch_size": 4})
    batch = next(iter(loop.make_data(config, types.SimpleNamespace(image_size=16))))
    views = MiniWorldViews()
    expected = np.stack([views({"image": image, "id": "", "scene_index": 0})["backbone"]
                         for image in images])
    by_id = dict(zip([str(x) for x in batch["id"]], batch["backbone"]))
    got = np.stack([by_id[f"{int(i):05d}.png"] for i in indices])
    np.testing.assert_allclose(got, expected, atol=1.01 / 127.5)  # the PNG's 8-bit rounding only
    # With CLIP's normalisation (the config default before) the views were far off.
    assert np.abs((images + 1) / 2 - np.asarray(CLIP_MEAN)).max() / min(CLIP_STD) > 1.5


def test_the_normalisation_comes_from_the_backbone_unless_the_config_sets_it(tmp_path):
    world = world_config()
    assert build.backbone_normalisation(world) == ((0.5,) * 3, (0.5,) * 3)  # its preprocessor_config.json
    assert build.backbone_normalisation(world_config("backbone=scratch")) == ((0.5,) * 3, (0.5,) * 3)
    clip = world_config(**{"backbone.init": str(tmp_path)})  # a CLIP folder that records nothing
    assert build.backbone_normalisation(clip) == (CLIP_MEAN, CLIP_STD)
    given = world_config(**{"backbone.mean": (0.1, 0.2, 0.3), "backbone.std": (1.0, 1.0, 1.0)})
    assert build.backbone_normalisation(given) == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    # A run records the resolved values (inference needs no backbone folder), and reads them back.
    recorded = build.with_backbone_normalisation(world)
    assert tuple(recorded.backbone.mean) == (0.5,) * 3 and tuple(world.backbone.mean) == ()
    pre = preprocess_config_for(recorded)
    assert tuple(pre.backbone_mean) == (0.5,) * 3 and tuple(pre.backbone_std) == (0.5,) * 3
