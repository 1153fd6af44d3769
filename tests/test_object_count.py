"""`projects.miniworld.object_count`: counting the objects a redrawing shows, and splitting world-FID."""

import numpy as np
import pytest
import scipy.linalg

from projects.miniworld import classifier, object_count, scenes


def test_the_classifier_counts_the_objects_of_true_scene_images():
    params, config = classifier.load_classifier()
    indices = scenes.evaluation_indices(64)
    truth = scenes.labels_of(indices)["occupied"].sum(axis=1)
    counted = object_count.drawn_objects(params, config, scenes.images_of(indices))
    assert set(truth.tolist()) >= {1, 2}  # held-out scenes with one and with two objects
    assert (counted == truth).mean() >= 0.95


def test_the_frechet_terms_add_up_to_the_distance_of_the_reference_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(0.5, 1.5, size=(200, 6))
    terms = object_count.frechet_terms(a, b)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert terms["fd"] == pytest.approx(expected, rel=1e-9)
    assert terms["mean_term"] == pytest.approx(((a.mean(0) - b.mean(0)) ** 2).sum())
    assert terms["mean_term"] + terms["covariance_term"] == pytest.approx(terms["fd"])


def _redrawings(rng, share_one: float, n: int = 400):
    """Features of a set of redrawings: two clusters (one object drawn / two drawn) in 8 dimensions."""
    one, two = np.zeros(8), np.zeros(8)
    one[0], two[0] = -3.0, 3.0
    counts = np.where(rng.random(n) < share_one, 1, 2)
    feats = np.where((counts == 1)[:, None], one, two) + 0.3 * rng.normal(size=(n, 8))
    return feats, counts


def test_a_run_that_draws_one_object_too_often_has_its_mean_term_along_the_one_object_direction():
    rng = np.random.default_rng(1)
    reference, _ = _redrawings(rng, share_one=0.05)
    good, good_counts = _redrawings(rng, share_one=0.3)
    bad, bad_counts = _redrawings(rng, share_one=0.6)
    direction = object_count.one_object_direction([good, bad], [good_counts, bad_counts])
    assert abs(direction[0]) == pytest.approx(1.0, abs=0.01)
    split_bad = object_count.mean_term_along(bad, reference, direction)
    split_good = object_count.mean_term_along(good, reference, direction)
    assert split_bad["mean_term"] > 3 * split_good["mean_term"]
    assert split_bad["share_along"] > 0.95


def test_an_offset_that_is_not_about_objects_is_not_counted_along_the_direction():
    rng = np.random.default_rng(2)
    reference, _ = _redrawings(rng, share_one=0.3)
    run, counts = _redrawings(rng, share_one=0.3)
    run = run + np.eye(8)[3] * 2.0  # e.g. a colour shift, orthogonal to the object direction
    direction = object_count.one_object_direction([run], [counts])
    split = object_count.mean_term_along(run, reference, direction)
    assert split["mean_term"] == pytest.approx(4.0, rel=0.1)
    assert split["share_along"] < 0.05


def test_the_direction_needs_redrawings_with_one_and_with_two_objects():
    with pytest.raises(ValueError, match="one and with two"):
        object_count.one_object_direction([np.zeros((4, 3))], [np.full(4, 2)])


def test_a_run_without_an_evaluation_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "runs" / "default_steps600_seed0").mkdir(parents=True)
    code = object_count.main(["--workdir", str(tmp_path), "--runs", "default_steps600_seed0"])
    assert code == 2
    assert "no third-party evaluation of the select half" in capsys.readouterr().err
