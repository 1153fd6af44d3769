"""The world's ablation options: training image sets (miniworld:train:objects=K / :pool=N and the world
config's images=...), punctuation with vocab=words, and a smaller pre-trained backbone (--width/--layers)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dediffusion_jax import config as config_lib
from dediffusion_jax.data import sources
from dediffusion_jax.models import quantizer, vit
from projects.miniworld import data_source, extensions, pretrain_backbone, scenes  # extensions: miniworld:
from projects.miniworld import tokenizer as world_tokenizer
from projects.miniworld.configs import world


def _scene_indices(source: data_source.MiniWorldSource) -> np.ndarray:
    return np.array([int(source[i]["scene_index"]) for i in range(len(source))])


# ------------------------------------------------------------------------------------ image sets


def test_the_image_sets_have_the_sizes_the_world_config_documents():
    assert len(scenes.split_indices("train")) == 3284 == scenes.NUM_SCENES - 364
    single, p = data_source.generative_distribution("train", objects=1)
    assert len(single) == 170 and np.allclose(p, 1 / 170)  # one-object scenes are equally likely
    assert len(data_source.scene_pool("train", 0, 64)) == 64
    for n in ("3,284", "170", "64"):
        assert n in world.__doc__


def test_objects_1_yields_only_one_object_train_scenes_and_objects_2_only_two():
    for objects in (1, 2):
        source = data_source.MiniWorldSource("train", size=500, seed=0, objects=objects)
        idx = _scene_indices(source)
        assert {len(scenes.scene_from_index(i).objects) for i in idx} == {objects}
        assert not scenes.held_out_mask()[idx].any()
    assert len(set(_scene_indices(data_source.MiniWorldSource("train", size=2000, objects=1)))) > 150


def test_a_pool_is_a_fixed_set_of_scenes_the_run_seed_only_reorders():
    a = data_source.MiniWorldSource("train", size=2000, seed=0, pool=64)
    b = data_source.MiniWorldSource("train", size=2000, seed=1, pool=64)
    ia, ib = _scene_indices(a), _scene_indices(b)
    assert len(set(ia)) <= 64 and set(ia) == set(ib)  # 2,000 uniform draws of 64 miss none in practice
    assert not np.array_equal(ia, ib)
    assert set(ia) <= set(scenes.split_indices("train"))
    assert set(ia) != set(data_source.MiniWorldSource("train", size=2000, pool=64, objects=2)._indices)


def test_the_default_source_draws_and_names_itself_as_before_the_options():
    source = data_source.MiniWorldSource("train", size=100, seed=3)
    np.testing.assert_array_equal(
        _scene_indices(source), scenes.sample_indices(np.random.default_rng([3, 7]), 100, "train"))
    assert repr(source) == "MiniWorldSource(split='train', size=100, seed=3)"


def test_specs_with_options_build_sources_that_name_their_options():
    built = sources.build_source("miniworld:train:objects=1")
    assert (built.source.objects, built.source.pool) == (1, 0) and "objects=1" in repr(built.source)
    assert "pool=64" in repr(sources.build_source("miniworld:train:pool=64").source)
    assert extensions.parse_spec("heldout:pool=8:objects=2") == ("heldout", {"pool": 8, "objects": 2})
    assert extensions.parse_spec("") == ("train", {})


@pytest.mark.parametrize("spec", ["miniworld:train:objects=3", "miniworld:train:pool=-1", "miniworld:train:size=9",
                                  "miniworld:train:pool", "miniworld:train:pool=a", "miniworld:test",
                                  "miniworld:train:pool=4:pool=8", "miniworld:heldout:pool=365"])
def test_bad_specs_are_one_error_naming_the_value(spec):
    with pytest.raises(sources.SourceSpecError, match="miniworld:") as e:
        sources.build_source(spec)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_the_images_arg_picks_the_data_source():
    assert world.get_config("").data.source == "miniworld:train"
    assert world.get_config("images=single").data.source == "miniworld:train:objects=1"
    assert world.get_config("images=pool").data.source == "miniworld:train:pool=64"
    assert world.get_config("data=/x").data.source == "tfds:mini_world:train@/x"
    with pytest.raises(config_lib.ConfigArgError, match="images=pool"):
        world.get_config("images=pool,data=/x")
    with pytest.raises(config_lib.ConfigArgError, match="images='coco'"):
        world.get_config("images=coco")


# ------------------------------------------------------------------------------------ punctuation


def test_punct_lets_the_encoder_emit_punctuation_with_the_world_words():
    tokenizer = world_tokenizer.load_tokenizer()
    comma = tokenizer.get_vocab()[",</w>"]

    def excluded(arg: str) -> np.ndarray:
        c = world.get_config(arg)
        return quantizer.vocabulary_exclusion_mask(tokenizer, bool(c.vocab.exclude_punctuation),
                                                   only_tokens=tuple(c.vocab.only_tokens))

    without, with_punct = excluded("vocab=words"), excluded("vocab=words,punct")
    assert without[comma] and not with_punct[comma]
    assert not with_punct[tokenizer.get_vocab()["red</w>"]]
    added = np.flatnonzero(without & ~with_punct)
    assert len(added) == len(world_tokenizer.PUNCTUATION)  # nothing but the punctuation entries


# ------------------------------------------------------------------------------------ smaller backbone


def test_the_default_backbone_shape_is_unchanged():
    assert pretrain_backbone.VISION_CONFIG == vit.ViTConfig(
        image_size=16, patch_size=4, hidden_size=128, num_layers=3, num_heads=4, mlp_dim=512, hidden_act="gelu")
    assert pretrain_backbone.world_vision_config() == pretrain_backbone.VISION_CONFIG
    assert pretrain_backbone.Pretrainer().vision_config == pretrain_backbone.VISION_CONFIG
    with pytest.raises(pretrain_backbone.errors.UserError, match="--width 48"):
        pretrain_backbone.world_vision_config(48)


def test_a_smaller_backbone_trains_exports_and_loads_as_a_de_diffusion_backbone(tmp_path):
    small = pretrain_backbone.world_vision_config(width=64, layers=2)
    assert (small.num_heads, small.mlp_dim) == (2, 256)
    trainer = pretrain_backbone.Pretrainer(steps=2, batch=8, vision_config=small)
    params, log = trainer.train(log_every=1, workdir=tmp_path / "run")
    assert params is not None and len(log) == 2
    out = pretrain_backbone.save_world_clip(params, trainer.text_config, tmp_path / "clip", {}, small)
    assert json.loads((out / "config.json").read_text())["vision_config"]["hidden_size"] == 64
    config, loaded = vit.load_clip_vision(out)
    assert (config.hidden_size, config.num_layers) == (64, 2)
    np.testing.assert_array_equal(loaded["vision_model"]["embeddings"]["class_embedding"],
                                  params["vision"]["vision_model"]["embeddings"]["class_embedding"])
    with pytest.raises(ValueError, match="vision_config"):  # the default shape does not fit these params
        pretrain_backbone.save_world_clip(params, trainer.text_config, tmp_path / "wrong", {})
