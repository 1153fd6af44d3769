"""The world's reconstruction evaluation runs on the core protocol: its pooled attribute scores equal
scoring the redrawn images directly, a scorer's counts pool over shards, and it plugs into config.evals."""

from __future__ import annotations

import numpy as np
import pytest

from dediffusion_jax.evaluation import evaluators, reconstruction
from dediffusion_jax.t2i import pipeline
from dediffusion_jax.t2i.folder import load_decoder
from projects.miniworld import captions, classifier, evaluator, metrics, scenes
from projects.miniworld.configs import world

NUM_SCENES, STEPS, GUIDANCE = 12, 2, 1.0


@pytest.fixture(scope="module")
def decoder():
    return load_decoder(world.DEFAULT_DECODER)


@pytest.fixture(scope="module")
def results(decoder, tmp_path_factory):
    indices = scenes.evaluation_indices(NUM_SCENES)
    sources = [evaluator.CaptionSource("full", captions.full_caption),
               evaluator.CaptionSource("empty", lambda s: "")]
    return indices, evaluator.evaluate(decoder, sources, indices, tmp_path_factory.mktemp("eval"),
                                       num_steps=STEPS, guidance_scale=GUIDANCE, batch_size=16)


def test_attribute_scores_equal_scoring_the_redrawn_images_directly(decoder, results):
    indices, res = results
    rows = evaluator.rows_of(res)
    assert list(rows) == ["full", "empty"]
    params, config = classifier.load_classifier()
    texts = [captions.full_caption(scenes.scene_from_index(int(i))) for i in indices]
    images = pipeline.generate(decoder, texts, num_steps=STEPS, guidance_scale=GUIDANCE, seed=0,
                               batch_size=16)
    direct = metrics.score_images(params, evaluator.to_float(images), indices, config)
    for attribute in metrics.ATTRIBUTES:
        assert rows["full"][attribute] == pytest.approx(direct[attribute], abs=1e-12), attribute
    assert np.isfinite(rows["full"]["world_fid"]) and rows["full"]["world_fid"] >= 0
    table = evaluator.markdown_table(res).splitlines()
    assert table[0] == "| text source | world-FID ↓ | world-KID ×10³ ↓ | " + " | ".join(metrics.ATTRIBUTES) + " |"
    assert rows["full"]["world_kid"] is not None and np.isfinite(rows["full"]["world_kid"])
    assert table[2] == (f"| full | {rows['full']['world_fid']:.1f} | {rows['full']['world_kid'] * 1e3:.2f} | "
                        + " | ".join(f"{rows['full'][a]:.3f}" for a in metrics.ATTRIBUTES) + " |")


def test_scorer_counts_pool_over_shards(tmp_path):
    """Two shards of unequal counts: the pooled score is sum(hits)/sum(counts), not a mean of means."""

    class Source:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"id": str(i), "image": np.full((4, 4, 3), 40 * i, np.uint8), "n": i + 1}

    class Texts:
        name, key = "t", "t"

        def texts(self, records):
            return [str(r["n"]) for r in records]

    def generate(prompts, guidance, seed):
        return np.zeros((len(prompts), 4, 4, 3), np.uint8)

    def scorer(images, records):  # each image: n objects, 1 of them right
        n = np.array([r["n"] for r in records], float)
        return {"right": (np.ones_like(n), n)}

    def extractor(images):
        return np.asarray(images, np.float32).reshape(len(images), -1)[:, :2] + np.arange(2)

    extractor.name = "toy"
    res = reconstruction.run_protocol(Source(), [Texts()], None, [1.0], 1, extractor, tmp_path,
                                      shard_size=2, generate_fn=generate, generator_key="zeros",
                                      resolution=4, scorer=scorer, scorer_key="toy", progress=False)
    assert res["sources"][0]["scores"]["1.0"]["right"] == pytest.approx(3 / 6)  # mean of means: 0.61


def test_the_evaluator_type_is_registered_and_built_from_config():
    import ml_collections

    import projects.miniworld.extensions  # noqa: F401 - registers miniworld.reconstruction

    config = ml_collections.ConfigDict({"evals": {"world": {"type": "miniworld.reconstruction",
                                                            "every_steps": 5, "num_scenes": 4}}})
    (ev,) = evaluators.build_evaluators(config)
    assert ev.name == "world" and ev.every_steps == 5 and len(ev.indices) == 4
    assert evaluators.due(ev, 10, 100) and not evaluators.due(ev, 11, 100) and evaluators.due(ev, 11, 11)
    bad = ml_collections.ConfigDict({"evals": {"w": {"type": "miniworld.reconstruction", "scenes": 4}}})
    with pytest.raises(evaluators.EvaluatorConfigError, match="scenes"):
        evaluators.build_evaluators(bad)
    with pytest.raises(evaluators.EvaluatorConfigError, match="not a registered"):
        evaluators.build_evaluators(ml_collections.ConfigDict({"evals": {"w": {"type": "nope"}}}))


@pytest.mark.slow  # ~30-70 s on 2 cores: .ci/run's slow phase keeps the default run under 20 min
def test_the_world_evaluator_runs_inside_training(tmp_path):
    """config.evals -> the trainer runs miniworld.reconstruction at the end; its scalars reach
    metrics.jsonl and its protocol workdir sits under WORKDIR/eval/NAME/step_N."""
    import json

    from dediffusion_jax.train.cli import load_config_file
    from dediffusion_jax.train.loop import train_and_evaluate

    config = load_config_file("projects/miniworld/configs/world.py:steps=3")
    with config.unlocked():
        config.batch_size, config.lr.warmup_steps = 8, 1
        config.log.update(dict(samples_every=0, progress_every=0, tensorboard=False))
        config.evals = {"world": {"type": "miniworld.reconstruction", "every_steps": 0, "num_scenes": 4,
                                  "ddim_steps": 2, "captions": True}}
    train_and_evaluate(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/world/de_diffusion_text/world_fid" in r]
    assert len(evals) == 1 and evals[0]["step"] == 3
    row = evals[0]
    assert 0.0 <= row["eval/world/de_diffusion_text/colour"] <= 1.0
    assert row["eval/world/full_caption/colour"] >= row["eval/world/empty_text/colour"]
    assert row["eval/world/distinct_texts"] >= 1
    assert (tmp_path / "eval" / "world" / "step_3" / "results.json").is_file()
