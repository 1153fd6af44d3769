"""The reconstruction-FID protocol: captions, texts -> tiny decoder -> FID; resume; the CLI."""

from __future__ import annotations

import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

from dediffusion_jax import evaluate
from dediffusion_jax.evaluation import reconstruction as rc
from dediffusion_jax.evaluation import report
from dediffusion_jax.evaluation import text_sources as ts
from projects.miniworld import tokenizer as world_tokenizer
from dediffusion_jax.t2i import folder
from helpers import tiny_decoder as tiny
from test_encode import tiny_encoder

RES = 16
GUIDANCE = (1.5, 3.0)
STEPS = 2


# --------------------------------------------------------------------------- caption selection


def test_caption_selection_on_a_toy_example():
    caps = ["A dog.", "a  dog on a\n sofa", "two dogs on a red sofa"]
    assert ts.longest_caption(caps) == "two dogs on a red sofa"
    assert ts.longest_caption(["ab", "cd"]) == "ab"  # first on ties
    assert ts.concat_captions(caps) == "A dog. a dog on a sofa. two dogs on a red sofa."
    # random: seeded per (seed, image id), independent of call order; varies across images
    picks = [ts.random_caption(caps, f"img{i}", seed=0) for i in range(30)]
    assert picks == [ts.random_caption(caps, f"img{i}", seed=0) for i in range(30)]
    assert set(picks) == {"A dog.", "a dog on a sofa", "two dogs on a red sofa"}
    assert [ts.random_caption(caps, f"img{i}", seed=1) for i in range(30)] != picks

    records = [{"id": "x", "captions": caps}, {"id": "y", "captions": [b"bytes caption"]}]
    assert ts.CaptionTexts("longest").texts(records) == ["two dogs on a red sofa", "bytes caption"]
    assert ts.CaptionTexts("random", seed=0).texts(records)[0] == ts.random_caption(caps, "x", 0)
    with pytest.raises(ValueError, match="no captions"):
        ts.CaptionTexts("longest").texts([{"id": "z"}])
    with pytest.raises(ValueError, match="unknown caption mode"):
        ts.CaptionTexts("shortest")


def test_markdown_table_marks_the_best_per_row():
    results = {
        "guidance_scales": ["1.5", "3.0"],
        "protocol": {"resolution": 256, "num_steps": 50, "extractor": "inception"},
        "num_images": 10,
        "sources": [{"name": "A", "fid": {"1.5": 9.0, "3.0": 7.25}, "best_guidance": "3.0",
                     "best_fid": 7.25},
                    {"name": "B", "fid": {"1.5": 4.0, "3.0": float("nan")},
                     "best_guidance": "1.5", "best_fid": 4.0}],
    }
    table = report.markdown_table(results)
    assert "| text source (FID, lower is better) | 1.5 | 3.0 | best |" in table
    assert "| A | 9.00 | **7.25** | 7.25 @ 3.0 |" in table
    assert "| B | **4.00** | n/a | 4.00 @ 1.5 |" in table


# ------------------------------------------------------------------------------ the protocol


class ListSource:
    """An in-memory image source: records like tfds coco_captions gives them."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return dict(self.records[i])

    def __repr__(self):
        return f"ListSource({len(self)})"


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_records(n: int = 6, corrupt: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        image = png_bytes(rng.integers(0, 256, (RES + 2 * (i % 2), RES, 3), np.uint8))
        if i == corrupt:
            image = b"not an image"
        records.append({"id": f"im{i}", "image": image,
                        "captions": [f"a picture number {i}", f"picture {i}"]})
    return records


class TinyExtractor:
    """A fixed random projection of 4x4 average-pooled pixels to 6 features."""

    name = "tiny_test_extractor"
    input_size = RES

    def __init__(self):
        self.proj = np.random.default_rng(0).normal(size=(4 * 4 * 3, 6))
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        x = np.asarray(images, np.float64) / 255.0
        b, h, w, c = x.shape
        pooled = x.reshape(b, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4)).reshape(b, -1)
        return pooled @ self.proj


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("decoder")
    folder.save_decoder(tiny.random_decoder("pixel", world_tokenizer.DEFAULT_DIR, seed=0), path)
    return path


@pytest.fixture(scope="module")
def decoder(decoder_dir):
    return folder.load_decoder(decoder_dir)


@pytest.fixture(scope="module")
def dediffusion_source(decoder):
    return ts.DeDiffusionTexts(tiny_encoder(decoder, batch_size=4), key="dediffusion:tiny-random")


class CountingGenerate:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, prompts, guidance, seed):
        self.calls.append((tuple(prompts), guidance, seed))
        return self.fn(prompts, guidance, seed)


def run(workdir, decoder, text_sources, generate=None, **kw):
    generate = generate or CountingGenerate(rc.flax_generate_fn(decoder, STEPS, batch_size=2))
    results = rc.run_protocol(
        ListSource(make_records()), text_sources, None, GUIDANCE, STEPS, TinyExtractor(),
        workdir, shard_size=2, resolution=RES, generate_fn=generate,
        generator_key="tiny-pixel", progress=False, grid_rows=3, **kw)
    return results, generate


def test_protocol_end_to_end_and_resume(tmp_path, decoder, dediffusion_source):
    sources = [ts.CaptionTexts("longest"), dediffusion_source]

    # Uninterrupted run: 3 shards (one image corrupt) x 2 text sources x 2 guidance scales.
    full, gen_full = run(tmp_path / "full", decoder, sources)
    assert len(gen_full.calls) == 12
    assert full["num_images"] == 5
    assert [s[0] for s in full["skipped_images"]] == ["im3"]
    assert [r["name"] for r in full["sources"]] == ["COCO longest caption", "De-Diffusion"]
    for row in full["sources"]:
        assert set(row["fid"]) == {"1.5", "3.0"}
        assert all(np.isfinite(v) and v >= 0 for v in row["fid"].values())
        assert row["best_fid"] == min(row["fid"].values())
        assert row["fid"][row["best_guidance"]] == row["best_fid"]
    # The caption source really prompted with the longest captions, in image order.
    prompts = [p for (ps, g, _) in gen_full.calls if g == 1.5 for p in ps]
    assert [p for p in prompts if p.startswith("a picture")] == [
        f"a picture number {i}" for i in (0, 1, 2, 4, 5)]
    assert len(prompts) == 10  # + the 5 De-Diffusion texts
    texts = (tmp_path / "full/sources/De-Diffusion/texts_00000.jsonl").read_text().splitlines()
    assert [json.loads(t)["id"] for t in texts] == ["im0", "im1"]

    on_disk = json.loads((tmp_path / "full/results.json").read_text())
    assert on_disk["sources"][0]["fid"] == pytest.approx(full["sources"][0]["fid"])
    table = (tmp_path / "full/results.md").read_text()
    for row in full["sources"]:
        best = f"**{report.format_fid(row['best_fid'])}**"
        assert f"| {row['name']} |" in table and best in table
    for name in ("grid.png", "grid_g1.5.png", "grid_g3.0.png"):
        grid = np.asarray(Image.open(tmp_path / "full" / name))
        assert grid.shape[0] > 3 * 64 and grid.shape[1] > 3 * 64  # 3 rows x 3 columns of cells

    # Interrupted after the first unit, then resumed: nothing finished is recomputed.
    with pytest.raises(rc.ProtocolStopped):
        run(tmp_path / "resumed", decoder, sources, max_shards=1)
    units = sorted((tmp_path / "resumed/sources").rglob("shard_*.npz"))
    assert len(units) == 1
    first_mtime = units[0].stat().st_mtime_ns
    resumed, gen_resumed = run(tmp_path / "resumed", decoder, sources)
    assert len(gen_resumed.calls) == 11
    assert units[0].stat().st_mtime_ns == first_mtime
    for a, b in zip(full["sources"], resumed["sources"]):
        assert a["fid"] == b["fid"] and a["best_guidance"] == b["best_guidance"]

    # A finished workdir reruns without generating anything; a new guidance scale adds only its
    # own units; other settings are refused.
    _, gen_again = run(tmp_path / "resumed", decoder, sources)
    assert gen_again.calls == []
    with pytest.raises(ValueError, match="seed"):
        run(tmp_path / "resumed", decoder, sources, seed=1)


def test_jsonl_texts_and_cli_resume(tmp_path, decoder_dir, monkeypatch, capsys):
    """The CLI with captions + a JSONL captioner; --max-shards 1, then a rerun finishes."""
    records = make_records()
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for r in records:
        (img_dir / f"{r['id']}.png").write_bytes(r["image"])
    jsonl = tmp_path / "other.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"im{i}.png", "text": f"other caption {i}"}) + "\n"
                             for i in range(6)))
    argv = ["--images", str(img_dir), "--decoder", str(decoder_dir), "--workdir",
            str(tmp_path / "work"), "--texts", f"Other={jsonl}", "--guidance", "2,4",
            "--steps", "2", "--resolution", str(RES), "--shard-size", "3", "--batch-size", "8",
            "--no-progress"]
    assert evaluate.main(argv + ["--max-shards", "1"], extractor=TinyExtractor()) == 0
    assert "rerun to resume" in capsys.readouterr().err
    assert not (tmp_path / "work/results.json").exists()
    assert evaluate.main(argv, extractor=TinyExtractor()) == 0
    results = json.loads((tmp_path / "work/results.json").read_text())
    assert results["num_images"] == 5 and results["guidance_scales"] == ["2.0", "4.0"]
    (row,) = results["sources"]
    assert row["name"] == "Other" and all(np.isfinite(list(row["fid"].values())))
    texts = [json.loads(line)["text"] for line in
             (tmp_path / "work/sources/Other/texts_00000.jsonl").read_text().splitlines()]
    assert texts == ["other caption 0", "other caption 1", "other caption 2"]

    # usage errors: no text source; captions without a captioned dataset
    with pytest.raises(SystemExit):
        evaluate.main(argv[:6], extractor=TinyExtractor())
    bad = argv[:6] + ["--captions", "longest", "--workdir", str(tmp_path / "w2")]
    assert evaluate.main(bad, extractor=TinyExtractor()) == 2
    assert "no captions" in capsys.readouterr().err


def random_inception_safetensors(path) -> str:
    """Random FID-Inception weights written as convert_inception writes them (no torch needed)."""
    from safetensors.numpy import save_file

    from dediffusion_jax.evaluation import inception

    variables = jax.jit(lambda k: inception.InceptionV3FID().init(
        k, *inception.dummy_inputs()))(jax.random.key(0))
    tensors = {k: np.ascontiguousarray(v, np.float32)
               for k, v in inception.variables_to_torch(variables).items()}
    save_file(tensors, str(path))
    return str(path)


@pytest.mark.slow  # 3-10 min on 2 busy cores: InceptionV3 at 299px on CPU, two CLI runs
def test_cli_on_a_tiny_tfds_dataset_with_random_inception_weights(tmp_path, decoder_dir):
    """The standard path: tfds captions -> decoder -> InceptionV3 (here random) FID."""
    from helpers import testing_builders

    testing_builders.build_tiny_captioned_images(tmp_path / "tfds")
    weights = random_inception_safetensors(tmp_path / "inception.safetensors")
    argv = ["--images", f"tfds:tiny_captioned_images:validation@{tmp_path / 'tfds'}",
            "--num-images", "4", "--decoder", str(decoder_dir), "--captions", "longest,concat",
            "--inception", weights, "--guidance", "3", "--steps", "2", "--resolution", str(RES),
            "--batch-size", "8", "--reference-cache", str(tmp_path / "cache"), "--no-progress"]
    assert evaluate.main(argv + ["--workdir", str(tmp_path / "work")]) == 0
    results = json.loads((tmp_path / "work/results.json").read_text())
    assert results["num_images"] == 4 and results["protocol"]["extractor"] == (
        "inception_v3_fid_pool3")
    assert [r["name"] for r in results["sources"]] == ["COCO longest caption",
                                                        "COCO concatenated"]
    assert all(np.isfinite(r["best_fid"]) for r in results["sources"])
    rows = [json.loads(line) for line in (
        tmp_path / "work/sources/COCO_concatenated/texts_00000.jsonl").read_text().splitlines()]
    for row in rows:  # the builder gives image 100i the captions "picture 100i caption c"
        i = int(row["id"].rsplit("=", 1)[1])
        assert row["text"] == " ".join(f"picture {i} caption {c}." for c in range(2 + i % 2))
    # a second workdir on the same images reuses the cached reference statistics
    assert len(list((tmp_path / "cache").glob("ref_*.npz"))) == 1
    assert evaluate.main(argv + ["--workdir", str(tmp_path / "work2")]) == 0
    assert not list((tmp_path / "work2/reference").glob("features_*.npz"))
    again = json.loads((tmp_path / "work2/results.json").read_text())
    assert again["sources"] == results["sources"]


def test_cli_torch_backend_runs_diffusers_stable_diffusion(tmp_path):
    """--backend torch: diffusers' StableDiffusionPipeline (DDIM) on a tiny SD-1 folder."""
    tiny.write_reference_folder("sd1", tmp_path / "sd1", world_tokenizer.DEFAULT_DIR)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for r in make_records(4, corrupt=-1):
        (img_dir / f"{r['id']}.png").write_bytes(r["image"])
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"im{i}.png", "text": f"red circle {i}"}) + "\n"
                             for i in range(4)))
    argv = ["--images", str(img_dir), "--decoder", str(tmp_path / "sd1"), "--backend", "torch",
            "--texts", str(jsonl), "--guidance", "1.5,3", "--steps", "2", "--resolution",
            str(RES), "--workdir", str(tmp_path / "work"), "--no-progress"]
    assert evaluate.main(argv, extractor=TinyExtractor()) == 0
    results = json.loads((tmp_path / "work/results.json").read_text())
    assert results["protocol"]["generator"].startswith("torch:")
    (row,) = results["sources"]
    assert row["name"] == "t" and all(np.isfinite(list(row["fid"].values())))


def test_cli_checkpoint_source_loads_a_text_encoder(tmp_path, decoder_dir, monkeypatch):
    from dediffusion_jax.inference import TextEncoder

    (tmp_path / "run/checkpoints/100").mkdir(parents=True)
    (tmp_path / "run/checkpoints/250").mkdir()
    assert ts.checkpoint_key(tmp_path / "run").endswith("run:step=250")
    assert ts.checkpoint_key(tmp_path / "run/checkpoints/100").endswith("step=100")

    calls = []

    def load(path, decoder=None, **kw):  # (tests/test_inference.py loads real checkpoints)
        calls.append(path)
        return tiny_encoder(folder.load_decoder(decoder_dir), **kw)

    monkeypatch.setattr(TextEncoder, "load", staticmethod(load))
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for r in make_records(3, corrupt=-1):
        (img_dir / f"{r['id']}.png").write_bytes(r["image"])
    argv = ["--images", str(img_dir), "--decoder", str(decoder_dir), "--checkpoint",
            f"DD-250={tmp_path / 'run'}", "--guidance", "3", "--steps", "2", "--resolution",
            str(RES), "--workdir", str(tmp_path / "work"), "--no-progress"]
    assert evaluate.main(argv, extractor=TinyExtractor()) == 0
    assert calls == [str(tmp_path / "run")]
    results = json.loads((tmp_path / "work/results.json").read_text())
    (row,) = results["sources"]
    assert row["name"] == "DD-250" and row["key"].endswith("step=250")
    assert np.isfinite(row["best_fid"])
    # training wrote a newer checkpoint: resuming into the same workdir is refused
    (tmp_path / "run/checkpoints/300").mkdir()
    assert evaluate.main(argv, extractor=TinyExtractor()) == 2
