"""The committed attribute classifier and the metrics built on it."""

import json

import numpy as np
import pytest

from projects.miniworld import classifier as C
from projects.miniworld import metrics as M
from projects.miniworld import scenes as S


@pytest.fixture(scope="module")
def committed():
    params, config = C.load_classifier()
    return params, config


@pytest.fixture(scope="module")
def heldout():
    idx = S.sample_indices(np.random.default_rng(123), 256, "heldout")
    return S.images_of(idx), [S.scene_from_index(int(i)) for i in idx]


def test_committed_classifier_reads_every_attribute_of_heldout_scenes(committed, heldout):
    params, config = committed
    assert 0.7e6 < C.num_params(params) < 0.9e6
    acc = M.score_images(params, *heldout, config=config)
    assert set(acc) == set(M.ATTRIBUTES)
    for k, v in acc.items():
        assert v >= 0.98, (k, acc)


def test_metrics_drop_on_shuffled_pairs(committed, heldout):
    params, config = committed
    images, scenes = heldout
    perm = np.random.default_rng(0).permutation(len(scenes))
    acc = M.score_images(params, images[perm], scenes, config=config)
    assert acc["exact_scene"] < 0.2 and acc["object"] < 0.5 and acc["background"] < 0.5
    assert acc["occupancy"] < 0.8


def test_named_object_drawn_finds_the_short_captions_object_in_any_cell(committed, heldout):
    params, config = committed
    images, scenes = heldout
    assert M.named_object_drawn(params, images, scenes, config) >= 0.98  # real images hold it
    # Images of other scenes rarely hold this scene's first object (12 kinds, 1-2 objects each).
    perm = np.random.default_rng(0).permutation(len(scenes))
    assert M.named_object_drawn(params, images[perm], scenes, config) < 0.35
    empty = np.broadcast_to(images[:1, :1, :1], images.shape)  # a background-only image
    assert M.named_object_drawn(params, np.ascontiguousarray(empty), scenes, config) < 0.1


def test_attribute_accuracy_definitions():
    truth = S.labels_of(np.array([S.scene_to_index(S.Scene("white", (S.SceneObject("red", "circle", 0, 0),)))]))
    pred = {k: v.copy() for k, v in truth.items()}
    assert all(v == 1.0 for v in M.attribute_accuracy(pred, truth).values())
    pred["occupied"][0, 3] = True  # an extra object in an empty cell: occupancy and exact scene only
    acc = M.attribute_accuracy(pred, truth)
    assert acc["occupancy"] == 0.75 and acc["exact_scene"] == 0.0
    assert acc["colour"] == acc["shape"] == acc["object"] == acc["background"] == 1.0
    pred = {k: v.copy() for k, v in truth.items()}
    pred["shape"][0, 0] = 2
    acc = M.attribute_accuracy(pred, truth)
    assert acc["shape"] == 0.0 and acc["object"] == 0.0 and acc["colour"] == 1.0 and acc["occupancy"] == 1.0


def test_features_and_frechet_distance(committed):
    params, config = committed
    rng = np.random.default_rng(0)
    a = S.images_of(S.sample_indices(rng, 256, "heldout"))
    b = S.images_of(S.sample_indices(rng, 256, "heldout"))
    assert C.features(params, a, config).shape == (256, config.feature_dim)
    same = M.world_fid(params, a, b, config)
    noisy = M.world_fid(params, a, np.clip(b + 0.5 * rng.standard_normal(b.shape), -1, 1).astype(np.float32), config)
    assert same < noisy
    assert abs(M.world_fid(params, a, a, config)) < 1e-3


def test_save_load_round_trip(tmp_path, committed):
    params, config = committed
    C.save_classifier(params, tmp_path, config)
    p2, c2 = C.load_classifier(tmp_path)
    assert c2 == config
    x = S.images_of(np.arange(8))
    np.testing.assert_array_equal(C.features(params, x, config), C.features(p2, x, config))


def test_training_on_the_spine_stops_resumes_exactly_and_exports(tmp_path):
    """A run stopped at step 2 and resumed exports the same weights as an uninterrupted run."""
    from dediffusion_jax import weights

    common = ["--steps", "4", "--batch", "8"]
    C.main(common + ["--out", str(tmp_path / "ref"), "--workdir", str(tmp_path / "ref_run")])
    C.main(common + ["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "run"), "--stop-after-steps", "2"])
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["2"]
    C.main(common + ["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "run")])
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["2", "4"]
    ref, got = (weights.read_file(tmp_path / d / "model.safetensors") for d in ("ref", "out"))
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(ref[k], got[k], err_msg=k)
    params, config = C.load_classifier(tmp_path / "out")
    assert config == C.ClassifierConfig()
    losses = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [4]  # every 100 steps and the last


def test_a_resume_with_other_arguments_is_refused_unless_allowed(tmp_path, capsys):
    """The spine's resume guard for a world program (issue 17 #1): another --lr on a stopped run's
    workdir is one error line naming it; --allow-changes steps extends a run on purpose."""
    common = ["--batch", "8", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "run")]
    C.main(common + ["--steps", "3", "--stop-after-steps", "2"])
    capsys.readouterr()
    assert C.main(common + ["--steps", "3", "--lr", "0.002"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "lr: 0.001 -> 0.002" in err[0] and "--allow-changes=lr" in err[0]
    assert C.main(common + ["--steps", "4", "--allow-changes", "steps"]) == 0
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["2", "4"]
