"""KID and CLIP score in the reconstruction protocol: values equal a direct computation from the
stored features / images; workdirs and reference caches from before KID still finalise; asking for
CLIP on a finished workdir regenerates exactly its units. Cheap: toy generators, no diffusion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dediffusion_jax.evaluation import clip_score, kid, report
from dediffusion_jax.evaluation import reconstruction as rc
from dediffusion_jax.evaluation import text_sources as ts
from test_evaluate import ListSource, TinyExtractor, make_records

GUIDANCE = (1.5, 3.0)


class NoiseGenerate:
    """Deterministic noise images per (prompt, guidance, seed): different texts -> different
    distributions, so KID and FID differ between rows."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, guidance, seed):
        self.calls += 1
        out = []
        for p in prompts:
            rng = np.random.default_rng([len(p), int(guidance * 10), seed])
            out.append(rng.integers(0, 256 if len(p) > 20 else 128, (32, 32, 3), np.uint8))
        return np.stack(out)


def run(workdir: Path, **kw):
    gen = NoiseGenerate()
    res = rc.run_protocol(ListSource(make_records()),
                          [ts.CaptionTexts("longest"), ts.CaptionTexts("concat")], None, GUIDANCE,
                          2, TinyExtractor(), workdir, shard_size=2, resolution=16, generate_fn=gen,
                          generator_key="noise", progress=False, grid_rows=2, **kw)
    return res, gen


def features(paths) -> np.ndarray:
    return np.concatenate([np.load(p)["features"] for p in paths if len(np.load(p)["ids"])])


def kid_row_values(res):
    return [(r["kid"], r["kid_std"], r["kid_at_best"]) for r in res["sources"]]


def test_kid_rows_equal_a_direct_computation_and_old_workdirs_still_finalise(tmp_path):
    work = tmp_path / "w"
    res, _ = run(work, kid_subsets=10, kid_subset_size=3)
    ref = features(sorted((work / "reference").glob("features_*.npz")))
    assert len(ref) == 5 and res["kid_settings"] == {"num_subsets": 10, "subset_size": 3, "seed": 0}
    assert res["kid_note"] is None
    for row in res["sources"]:
        assert set(row["kid"]) == set(row["fid"]) == {"1.5", "3.0"}
        for g in row["kid"]:
            gen = features(sorted((work / row["dir"] / f"g{g}").glob("shard_*.npz")))
            want = kid.kernel_inception_distance(gen, ref, num_subsets=10, subset_size=3, seed=0)
            assert (row["kid"][g], row["kid_std"][g]) == pytest.approx(want, rel=1e-12)
        assert row["kid_at_best"] == row["kid"][row["best_guidance"]]
    assert res["sources"][0]["kid"] != res["sources"][1]["kid"]
    table = (work / "results.md").read_text()
    assert "| best | KID ×10³ at best |" in table and "| text source (KID ×10³, lower is better) |" in table
    row = res["sources"][0]
    assert f"| {report.format_kid(row['kid_at_best'])} |" in table
    on_disk = json.loads((work / "results.json").read_text())
    assert on_disk["sources"][0]["kid"] == row["kid"]

    # A workdir finished before KID: no features beside the cached statistics. Its own per-shard
    # reference features rebuild them; nothing is generated; every number is the same.
    cache = Path(res["reference_stats"])
    companion = cache.parent / "features" / cache.name
    assert companion.is_file()
    companion.unlink()
    again, gen = run(work, kid_subsets=10, kid_subset_size=3)
    assert gen.calls == 0 and companion.is_file()
    assert kid_row_values(again) == kid_row_values(res)
    assert [r["fid"] for r in again["sources"]] == [r["fid"] for r in res["sources"]]

    # ... and one whose per-shard reference features are gone too: KID n/a with a note, FID intact.
    companion.unlink()
    for p in (work / "reference").glob("features_*.npz"):
        p.unlink()
    old, gen = run(work, kid_subsets=10, kid_subset_size=3)
    assert gen.calls == 0
    assert "KID n/a" in old["kid_note"] and "--reference-cache" in old["kid_note"]
    for row, before in zip(old["sources"], res["sources"]):
        assert row["fid"] == before["fid"] and row["best_guidance"] == before["best_guidance"]
        assert set(row["kid"].values()) == {None} and row["kid_at_best"] is None
    table = (work / "results.md").read_text()
    assert old["kid_note"] in table and "| n/a |" in table


def test_a_new_workdir_on_an_old_shared_cache_extracts_the_reference_features(tmp_path):
    cache = tmp_path / "cache"
    first, _ = run(tmp_path / "a", reference_cache_dir=cache, kid_subsets=4)
    for p in (cache / "features").glob("*.npz"):  # as a cache written before KID
        p.unlink()
    second, gen = run(tmp_path / "b", reference_cache_dir=cache, kid_subsets=4)
    assert gen.calls == 12 and second["kid_note"] is None
    assert kid_row_values(second) == kid_row_values(first)
    # the cache now has them: a third workdir decodes no reference features of its own
    run(tmp_path / "c", reference_cache_dir=cache, kid_subsets=4)
    assert not list((tmp_path / "c/reference").glob("features_*.npz"))


def test_bad_kid_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="kid_subset_size >= 2"):
        run(tmp_path / "w", kid_subset_size=1)


# ------------------------------------------------------------------------------ CLIP score

CLIP_DIR = "projects/miniworld/assets/backbone"
TOKENIZER_DIR = "projects/miniworld/assets/tokenizer"


def test_clip_score_per_source_and_guidance_on_the_world(tmp_path):
    """A perfect 'decoder' draws the scene its full caption names; an empty text draws black."""
    from projects.miniworld import captions, scenes

    idx = scenes.evaluation_indices(8)
    images = np.clip(np.round((scenes.images_of(idx) + 1) * 127.5), 0, 255).astype(np.uint8)
    texts = [captions.full_caption(scenes.scene_from_index(int(i))) for i in idx]
    records = [{"id": str(i), "image": im, "captions": [t]} for i, im, t in zip(idx, images, texts)]

    class Empty:
        name, key = "empty", "empty"

        def texts(self, recs):
            return [""] * len(recs)

    calls = []

    def draw(prompts, guidance, seed):
        calls.append(len(prompts))
        out = np.zeros((len(prompts), 16, 16, 3), np.uint8)
        for j, p in enumerate(prompts):
            scene = captions.parse_full_caption(p)
            if scene is not None:
                out[j] = images[texts.index(p)]
        return out

    def toy_features(batch):
        return np.asarray(batch, np.float32).reshape(len(batch), -1)[:, ::97]

    toy_features.name, toy_features.input_size = "toy", 16
    scorer = clip_score.ClipScorer(CLIP_DIR, TOKENIZER_DIR, device="cpu")

    def protocol(**kw):
        return rc.run_protocol(ListSource(records), [ts.CaptionTexts("longest"), Empty()], None,
                               [1.0, 2.0], 1, toy_features, tmp_path, shard_size=4, resolution=16,
                               generate_fn=draw, generator_key="perfect", progress=False, **kw)

    plain = protocol()
    assert "clip_score" not in plain["sources"][0] and "clip_model" not in plain
    n = len(calls)
    res = protocol(clip=scorer)  # a finished workdir: every unit is generated again for CLIP
    assert len(calls) == 2 * n and res["clip_model"] == scorer.name
    full, empty = res["sources"]
    want = clip_score.clip_score(scorer.cosines(images, texts))
    assert full["clip_score"]["1.0"] == pytest.approx(want, abs=1e-4)
    assert full["clip_score"]["2.0"] == pytest.approx(want, abs=1e-4)
    assert empty["clip_score"]["1.0"] < full["clip_score"]["1.0"] - 20
    assert full["fid"] == plain["sources"][0]["fid"]
    assert "| text source (CLIP score, higher is better) |" in (tmp_path / "results.md").read_text()
    protocol(clip=scorer)
    assert len(calls) == 2 * n  # now done, with CLIP


def test_cli_reports_kid_and_clip_score(tmp_path, monkeypatch, capsys):
    """`python -m dediffusion_jax.evaluate ... --clip FOLDER --clip-tokenizer FOLDER` (the decoder
    replaced by the noise generator: the CLI's plumbing, not diffusion, is under test)."""
    import types

    from dediffusion_jax import evaluate
    from dediffusion_jax.t2i import folder

    monkeypatch.setattr(folder, "load_decoder",
                        lambda path, dtype=None: types.SimpleNamespace(identity="noise"))
    monkeypatch.setattr(rc, "flax_generate_fn", lambda *a, **k: NoiseGenerate())
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, r in enumerate(make_records(4, corrupt=-1)):
        (img_dir / f"{r['id']}.png").write_bytes(r["image"])
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"im{i}.png", "text": f"red circle top left {i}"})
                             + "\n" for i in range(4)))
    argv = ["--images", str(img_dir), "--decoder", str(tmp_path), "--texts", f"T={jsonl}",
            "--guidance", "2", "--steps", "1", "--resolution", "16", "--workdir",
            str(tmp_path / "work"), "--no-progress", "--kid-subsets", "3"]
    assert evaluate.main(argv + ["--clip", CLIP_DIR, "--clip-tokenizer", TOKENIZER_DIR],
                         extractor=TinyExtractor()) == 0
    assert "KID ×10³" in capsys.readouterr().err
    results = json.loads((tmp_path / "work/results.json").read_text())
    (row,) = results["sources"]
    assert 0 <= row["clip_score"]["2.0"] <= 100 and row["kid"]["2.0"] is not None
    assert results["kid_settings"]["num_subsets"] == 3
    # one-line user errors: a folder that is no CLIP, a tokenizer without --clip
    assert evaluate.main(argv + ["--clip", str(tmp_path)], extractor=TinyExtractor()) == 2
    assert "missing config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(argv + ["--clip-tokenizer", TOKENIZER_DIR], extractor=TinyExtractor())


def test_an_extractor_with_large_features_says_how_kid_scales_them(tmp_path):
    """KID's cubic kernel assumes x.y/d of order 1; an extractor's `kid_feature_scale` is applied to
    both sides (and recorded), so the KID equals a direct computation on the scaled features."""
    class ScaledExtractor(TinyExtractor):
        kid_feature_scale = 0.25

    work = tmp_path / "w"
    res = rc.run_protocol(ListSource(make_records()), [ts.CaptionTexts("longest")], None, (3.0,), 2,
                          ScaledExtractor(), work, shard_size=2, resolution=16, generate_fn=NoiseGenerate(),
                          generator_key="noise", progress=False, grid_rows=2, kid_subsets=10, kid_subset_size=3)
    assert res["kid_settings"]["feature_scale"] == 0.25
    ref = features(sorted((work / "reference").glob("features_*.npz")))
    gen = features(sorted((work / res["sources"][0]["dir"] / "g3.0").glob("shard_*.npz")))
    want, _ = kid.kernel_inception_distance(0.25 * gen, 0.25 * ref, num_subsets=10, subset_size=3, seed=0)
    assert res["sources"][0]["kid"]["3.0"] == pytest.approx(want, rel=1e-12)
    unscaled, _ = kid.kernel_inception_distance(gen, ref, num_subsets=10, subset_size=3, seed=0)
    assert unscaled != pytest.approx(want)
