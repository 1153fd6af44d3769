"""The encode command: images -> De-Diffusion text JSONL, corrupt images reported and skipped."""

from __future__ import annotations

import json
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from dediffusion_jax import encode
from projects.miniworld import tokenizer as world_tokenizer
from dediffusion_jax.parallel.mesh import make_mesh
from dediffusion_jax.t2i import tiny
from dediffusion_jax.train import builders

IMAGE = 16


def tiny_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "backbone": {"variant": "Ti/4", "image_size": IMAGE, "init": "", "frozen": False,
                     "overrides": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                   "mlp_dim": 64}},
        "encoder": {"num_queries": 6, "pooler_blocks": 1, "pooler_width": 32, "pooler_heads": 2},
        "vocab": {"exclude_punctuation": True, "exclude_tokens": []},
        "quantizer": {"hard": True, "token_path": "fused",
                      "temperature": {"schedule": "exponential", "start": 2.0, "end": 0.3}},
        "total_steps": 100,
        "dtype": "float32",
    })


def tiny_dediffusion(decoder=None, seed: int = 1):
    """(config, model, trainable, frozen) as `train.checkpoint.load_for_inference` returns them,
    built directly from a random tiny pixel decoder and a random encoder."""
    if decoder is None:
        decoder = tiny.random_decoder("pixel", world_tokenizer.DEFAULT_DIR, seed=0)
    config = tiny_config()
    model, init_params, _ = builders.build_model(config, decoder)
    trainable = jax.jit(init_params)(jax.random.key(seed))
    return config, model, trainable, {"decoder": decoder.params}


def write_pngs(folder, n: int, size: int = IMAGE, seed: int = 0) -> list[str]:
    """n random RGB PNGs named img_000.png ...; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        name = f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 4 * (i % 2), 3), np.uint8)).save(
            folder / name)
        names.append(name)
    return names


@pytest.fixture(scope="module")
def built():
    return tiny_dediffusion()


def test_folder_with_a_corrupt_file_gives_one_line_per_good_image(built, tmp_path, capsys):
    config, model, trainable, frozen = built
    names = write_pngs(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")

    out = tmp_path / "texts.jsonl"
    mesh = make_mesh({"data": 2}, devices=jax.devices()[:2])
    summary = encode.encode_to_jsonl([str(tmp_path / "imgs")], out, config, model, trainable,
                                     frozen, batch_size=2, mesh=mesh, progress=False)

    err = capsys.readouterr().err
    assert summary["encoded"] == 5 and summary["skipped"] == 1
    assert "broken.png" in summary["errors"][0][0] and "broken.png" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == names  # the folder source's relative paths, in order
    assert all(r["path"].endswith(r["id"]) for r in rows)

    # The ids are the model's argmax tokens of the backbone views, the text their detokenization.
    pre = encode.preprocess_config_for(config)
    views = np.stack([encode.backbone_view({"image": (tmp_path / "imgs" / n).read_bytes()}, pre)
                      for n in names])
    expected = np.asarray(jax.jit(model.token_ids)(trainable, frozen, views))
    assert np.array_equal(np.array([r["token_ids"] for r in rows]), expected)
    assert expected.shape == (5, model.num_tokens)
    assert [r["text"] for r in rows] == model.texts(expected)
    assert all(isinstance(r["text"], str) for r in rows)


def test_files_and_missing_files(built, tmp_path, capsys):
    config, model, trainable, frozen = built
    write_pngs(tmp_path, 2)
    files = [str(tmp_path / "img_000.png"), str(tmp_path / "nope.png"),
             str(tmp_path / "img_001.png")]
    out = tmp_path / "t.jsonl"
    summary = encode.encode_to_jsonl(files, out, config, model, trainable, frozen,
                                     batch_size=4, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [files[0], files[2]]
    # a missing file is unreadable like a corrupt one: reported, counted, skipped
    assert summary["encoded"] == 2 and summary["skipped"] == 1
    assert summary["errors"][0][0] == files[1] and "nope.png" in capsys.readouterr().err


def test_cli_calls_load_for_inference(built, tmp_path, monkeypatch, capsys):
    calls = []

    def load_for_inference(path):
        calls.append(path)
        return built

    try:
        from dediffusion_jax.train import checkpoint
        monkeypatch.setattr(checkpoint, "load_for_inference", load_for_inference)
    except ImportError:  # the checkpoint module lands separately; stand in for it
        fake = types.ModuleType("dediffusion_jax.train.checkpoint")
        fake.load_for_inference = load_for_inference
        monkeypatch.setitem(sys.modules, "dediffusion_jax.train.checkpoint", fake)
    write_pngs(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "zz_bad.jpg").write_bytes(b"garbage")
    out = tmp_path / "out.jsonl"
    rc = encode.main(["--checkpoint", "WORK/checkpoints/7", "--images", str(tmp_path / "imgs"),
                      "--out", str(out), "--batch-size", "2", "--no-progress"])
    assert rc == 0 and calls == ["WORK/checkpoints/7"]
    assert len(out.read_text().splitlines()) == 3
    err = capsys.readouterr().err
    assert "zz_bad.jpg" in err and "skipped 1 unreadable" in err
