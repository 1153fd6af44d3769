"""The world's pre-trained backbone: the contrastive loss, a short pre-training run, the exported CLIP
folder (transformers parity, De-Diffusion's backbone loader), and the committed artifact's quality."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from projects.miniworld.configs import world as miniworld_config
from projects.miniworld import pretrain_backbone, scenes
from projects.miniworld import tokenizer as world_tokenizer
from dediffusion_jax.models import vit
from dediffusion_jax.models import build


def _unit(x):
    x = np.asarray(x, np.float32)
    return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True))


def test_contrastive_loss_is_near_zero_for_a_perfect_pairing_and_higher_for_a_wrong_one():
    emb = _unit(np.eye(4, 8))
    ids = jnp.arange(4)
    assert float(pretrain_backbone.contrastive_loss(emb, emb, jnp.float32(100.0), ids)) < 1e-6
    assert float(pretrain_backbone.contrastive_loss(emb, emb[::-1], jnp.float32(100.0), ids)) > 10.0


def test_repeats_of_a_scene_in_a_batch_are_all_positives():
    """Rows 0 and 1 are the same scene (e.g. two captions with shuffled segments): exchanging their two
    texts changes nothing, whereas with distinct scene ids it is a wrong pairing."""
    rng = np.random.default_rng(0)
    img, txt = _unit(rng.normal(size=(3, 8))), _unit(rng.normal(size=(3, 8)))
    swapped = txt[jnp.array([1, 0, 2])]
    scale = jnp.float32(10.0)
    same = jnp.array([5, 5, 9])
    a = pretrain_backbone.contrastive_loss(img, txt, scale, same)
    b = pretrain_backbone.contrastive_loss(img, swapped, scale, same)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    distinct = jnp.array([5, 6, 9])
    assert abs(float(pretrain_backbone.contrastive_loss(img, txt, scale, distinct))
               - float(pretrain_backbone.contrastive_loss(img, swapped, scale, distinct))) > 1e-3


def test_batches_come_from_train_scenes_and_are_a_function_of_seed_and_step():
    trainer = pretrain_backbone.Pretrainer(steps=2, batch=16, seed=3)
    images, ids, scene_ids = trainer.batch_for_step(5)
    again = trainer.batch_for_step(5)
    for x, y in zip((images, ids, scene_ids), again):
        np.testing.assert_array_equal(x, y)
    assert not scenes.held_out_mask()[scene_ids].any()
    np.testing.assert_array_equal(images, scenes.images_of(scene_ids))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("world_clip")
    assert pretrain_backbone.main(["--out", str(out), "--steps", "40", "--batch", "32"]) == 0
    return out


def test_a_short_run_lowers_the_loss_and_records_itself(short_run):
    info = json.loads((short_run / "TRAINING.json").read_text())
    losses = [r["loss"] for r in info["log"]]
    assert info["args"]["steps"] == 40 and info["split"] == "train"
    assert losses[-1] < 0.8 * np.log(32)  # chance level of a 32-way contrastive batch is log 32
    assert 0.0 <= info["zero_shot_scene_accuracy"]["heldout"] <= 1.0


@pytest.mark.parity
def test_the_exported_folder_is_a_transformers_clip_model_with_the_same_outputs(short_run):
    model, params = pretrain_backbone.load_world_clip(short_run)
    reference = transformers.CLIPModel.from_pretrained(str(short_run), torch_dtype=torch.float32).eval()
    images = scenes.images_of(scenes.evaluation_indices(4))
    tok = world_tokenizer.load_tokenizer()
    ids = world_tokenizer.encode(tok, ["red circle top left , white background", "blue square bottom right ,"
                                       " gray background", "", "green triangle"])
    img, txt, _ = model.apply({"params": params}, jnp.asarray(images), jnp.asarray(ids))
    with torch.no_grad():
        ref = reference(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                        input_ids=torch.from_numpy(ids.astype(np.int64)))
    np.testing.assert_allclose(np.asarray(img), ref.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(txt), ref.text_embeds.numpy(), atol=1e-5)
    scale = float(np.exp(params["logit_scale"]))
    np.testing.assert_allclose(scale * np.asarray(img @ txt.T), ref.logits_per_image.numpy(), atol=1e-4)


def test_de_diffusion_loads_the_vision_tower_of_the_exported_folder(short_run):
    config, params = vit.load_clip_vision(short_run)
    assert config == pretrain_backbone.VISION_CONFIG
    _, world = pretrain_backbone.load_world_clip(short_run)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(world["vision"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_world_config_freezes_the_committed_backbone_and_scratch_is_the_random_init_ablation():
    c = miniworld_config.get_config()
    assert c.backbone.init == miniworld_config.WORLD_BACKBONE and c.backbone.frozen
    module, params = build.build_backbone(c)
    assert params is not None and module.config == pretrain_backbone.VISION_CONFIG
    scratch = miniworld_config.get_config("backbone=scratch")
    assert scratch.backbone.init == "" and not scratch.backbone.frozen
    module, params = build.build_backbone(scratch)
    assert params is None and module.config.hidden_size == pretrain_backbone.VISION_CONFIG.hidden_size


def test_the_committed_backbone_names_held_out_scenes_zero_shot():
    """Held-out scenes were never seen by either tower: the image must still be nearest to its own
    caption among all 3,648 (chance 0.0003). The whole run measured its accuracy in TRAINING.json."""
    folder = pretrain_backbone.DEFAULT_DIR
    model, params = pretrain_backbone.load_world_clip(folder)
    accuracy = pretrain_backbone.zero_shot_accuracy(model, params, scenes.evaluation_indices(128))
    recorded = json.loads((folder / "TRAINING.json").read_text())["zero_shot_scene_accuracy"]["heldout"]
    assert accuracy >= 0.9 and recorded >= 0.9, (accuracy, recorded)


def test_pretraining_on_the_spine_stops_resumes_exactly_and_exports(tmp_path):
    """A run stopped at step 2 and resumed exports the same CLIP folder as an uninterrupted run."""
    from dediffusion_jax import weights

    common = ["--steps", "4", "--batch", "8"]
    assert pretrain_backbone.main(common + ["--out", str(tmp_path / "ref"), "--workdir", str(tmp_path / "ref_run")]) == 0
    assert pretrain_backbone.main(common + ["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "run"),
                                            "--stop-after-steps", "2"]) == 0
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["2"]
    assert pretrain_backbone.main(common + ["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "run")]) == 0
    ref, got = (weights.read_file(tmp_path / d / "model.safetensors") for d in ("ref", "out"))
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(ref[k], got[k], err_msg=k)
    info = json.loads((tmp_path / "out" / "TRAINING.json").read_text())
    assert [r["step"] for r in info["log"]] == [4]
    pretrain_backbone.load_world_clip(tmp_path / "out")
