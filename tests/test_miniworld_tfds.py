"""The miniature world as the tfds dataset `mini_world`: build it, read it through the standard source,
and train-read it through the standard pipeline with projects/miniworld/configs/world.py:data=DIR.

    python -m projects.miniworld.tfds_builder --data_dir DIR   # what build_mini_world runs
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dediffusion_jax.data import preprocess, sources
from projects.miniworld import data_source as miniworld_source
from projects.miniworld import captions, scenes
from projects.miniworld.tfds_builder import build_mini_world
from dediffusion_jax.train import cli, loop

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN = 64
TOLERANCE = 1 / 127.5  # PNG stores uint8: the render is kept to within half a level


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tfds")
    build_mini_world(path, num_train=NUM_TRAIN)
    return path


def scene_index_of(record_id: str) -> int:
    """TfdsSource ids look like 'mini_world/image/id=123'."""
    name, _, index = record_id.rpartition("=")
    assert name == "mini_world/image/id", record_id
    return int(index)


def test_heldout_split_is_every_heldout_scene_once_with_its_pixels_and_captions(data_dir):
    source = sources.source_from_spec(f"tfds:mini_world:heldout@{data_dir}")
    expected = scenes.split_indices("heldout")
    assert len(source) == len(expected)
    records = [source[i] for i in range(len(source))]
    assert [scene_index_of(r["id"]) for r in records] == expected.tolist()  # index order
    images = np.stack([np.asarray(preprocess.decode_image(r["image"])) for r in records])
    assert images.shape == (len(expected), 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_allclose(images / 127.5 - 1.0, scenes.images_of(expected), atol=TOLERANCE)
    for r, i in zip(records, expected.tolist()):
        scene = scenes.scene_from_index(i)
        assert r["captions"] == [captions.full_caption(scene), captions.short_caption(scene)]


def test_train_split_is_deterministic_and_draws_only_train_scenes(data_dir, tmp_path):
    build_mini_world(tmp_path, num_train=NUM_TRAIN)  # a second, independent build
    ids = [[scene_index_of(s[i]["id"]) for i in range(len(s))]
           for s in (sources.source_from_spec(f"tfds:mini_world:train@{d}") for d in (data_dir, tmp_path))]
    assert len(ids[0]) == NUM_TRAIN and ids[0] == ids[1]
    assert set(ids[0]) <= set(scenes.split_indices("train").tolist())
    # The same draws as the on-the-fly source, item for item.
    on_the_fly = miniworld_source.MiniWorldSource("train", size=NUM_TRAIN)
    assert ids[0] == [int(on_the_fly[i]["scene_index"]) for i in range(NUM_TRAIN)]


def test_a_data_dir_built_with_another_train_size_is_refused(data_dir):
    with pytest.raises(ValueError, match="num_train=64"):
        build_mini_world(data_dir, num_train=NUM_TRAIN + 1)


def test_the_training_config_reads_the_same_views_as_the_on_the_fly_world(data_dir):
    decoder_path = REPO / "projects/miniworld/assets/decoder"
    config = cli.load_config_file(f"{REPO}/projects/miniworld/configs/world.py:data={data_dir},decoder={decoder_path},eval_every=0")
    assert config.data.source == f"tfds:mini_world:train@{data_dir}"
    batch = next(iter(loop.make_data(config, loop.load_decoder_for(config))))

    indices = [scene_index_of(str(i)) for i in batch["id"]]
    assert len(indices) == config.batch_size
    views = miniworld_source.MiniWorldViews(int(config.backbone.image_size))
    # A MiniWorldSource item of scene i, as the miniworld:train source would give it.
    expected = [views({"image": scenes.images_of([i])[0], "id": scenes.scene_from_index(i).key,
                       "scene_index": i}) for i in indices]
    for key in ("backbone", "decoder"):
        assert batch[key].shape == (config.batch_size, 16, 16, 3)
        np.testing.assert_allclose(batch[key], np.stack([e[key] for e in expected]), atol=TOLERANCE)
