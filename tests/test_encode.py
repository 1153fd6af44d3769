"""The encode command: images -> De-Diffusion text JSONL, corrupt images reported and skipped."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from dediffusion_jax import encode
from dediffusion_jax.inference import TextEncoder
from dediffusion_jax.models import build
from dediffusion_jax.parallel.mesh import make_mesh
from dediffusion_jax.t2i import folder
from projects.miniworld import tokenizer as world_tokenizer
from helpers import tiny_decoder as tiny
from test_train_loop import tiny_config as world_tiny_config
from test_train_loop import write_decoder

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


def tiny_encoder(decoder=None, seed: int = 1, *, batch_size: int = 4, mesh=None) -> TextEncoder:
    """A `TextEncoder` around a random tiny encoder and a random tiny pixel decoder (no training)."""
    if decoder is None:
        decoder = tiny.random_decoder("pixel", world_tokenizer.DEFAULT_DIR, seed=0)
    config = tiny_config()
    model, init_params, _ = build.build_model(config, decoder.spec)
    trainable = jax.jit(init_params)(jax.random.key(seed))
    return TextEncoder(config, model, trainable, {}, decoder, batch_size=batch_size, mesh=mesh)


def write_checkpoint(workdir: Path, decoder_dir: Path, step: int = 3) -> Path:
    """A real checkpoint (the training program's save) of an untrained tiny world-config run."""
    from dediffusion_jax.train import checkpoint as ckpt_lib
    from dediffusion_jax.train import loop

    config = world_tiny_config(decoder_dir)
    parts = loop.build_parts(config, folder.load_decoder(decoder_dir))
    state = jax.jit(parts.init_state)(jax.random.key(int(config.seed)), parts.state_backbone_arg)
    manager = ckpt_lib.make_manager(workdir, async_save=False)
    try:
        ckpt_lib.save(manager, step, state, None, config, ckpt_lib.decoder_info(parts.decoder))
        manager.wait_until_finished()
    finally:
        manager.close()
    return workdir


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


def test_folder_with_a_corrupt_file_gives_one_line_per_good_image(tmp_path, capsys):
    mesh = make_mesh({"data": 2}, devices=jax.devices()[:2])
    encoder = tiny_encoder(batch_size=2, mesh=mesh)
    names = write_pngs(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")

    out = tmp_path / "texts.jsonl"
    summary = encode.encode_to_jsonl([str(tmp_path / "imgs")], out, encoder, progress=False)

    err = capsys.readouterr().err
    assert summary["encoded"] == 5 and summary["skipped"] == 1
    assert "broken.png" in summary["errors"][0][0] and "broken.png" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == names  # the folder source's relative paths, in order
    assert all(r["path"].endswith(r["id"]) for r in rows)

    # The ids are the model's argmax tokens of the backbone views, the text their detokenization.
    views = np.stack([encode.backbone_view({"image": (tmp_path / "imgs" / n).read_bytes()},
                                           encoder.preprocess) for n in names])
    model = encoder.model
    expected = np.asarray(jax.jit(model.token_ids)(encoder.trainable, {}, views))
    assert np.array_equal(np.array([r["token_ids"] for r in rows]), expected)
    assert expected.shape == (5, model.num_tokens)
    assert [r["text"] for r in rows] == model.texts(expected)
    assert all(isinstance(r["text"], str) for r in rows)


def test_files_and_missing_files(tmp_path, capsys):
    write_pngs(tmp_path, 2)
    files = [str(tmp_path / "img_000.png"), str(tmp_path / "nope.png"),
             str(tmp_path / "img_001.png")]
    out = tmp_path / "t.jsonl"
    summary = encode.encode_to_jsonl(files, out, tiny_encoder(), progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [files[0], files[2]]
    # a missing file is unreadable like a corrupt one: reported, counted, skipped
    assert summary["encoded"] == 2 and summary["skipped"] == 1
    assert summary["errors"][0][0] == files[1] and "nope.png" in capsys.readouterr().err


def test_cli_reads_a_checkpoint_and_its_exported_folder(tmp_path, capsys):
    decoder_dir = write_decoder(tmp_path / "decoder", seed=0)
    workdir = write_checkpoint(tmp_path / "run", decoder_dir)
    write_pngs(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "zz_bad.jpg").write_bytes(b"garbage")

    def run(checkpoint, out, *extra):
        return encode.main(["--checkpoint", str(checkpoint), "--images", str(tmp_path / "imgs"),
                            "--out", str(out), "--batch-size", "2", "--no-progress", *extra])

    assert run(workdir / "checkpoints" / "3", tmp_path / "a.jsonl") == 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    err = capsys.readouterr().err
    assert len(rows) == 3 and "zz_bad.jpg" in err and "skipped 1 unreadable" in err
    encoder = TextEncoder.from_checkpoint(workdir)
    views = np.stack([encode.backbone_view({"image": (tmp_path / "imgs" / r["id"]).read_bytes()},
                                           encoder.preprocess) for r in rows])
    np.testing.assert_array_equal([r["token_ids"] for r in rows], encoder.token_ids(views))

    # The exported folder, with the decoder given explicitly, writes the same file.
    exported = encoder.export(tmp_path / "exported")
    assert run(exported, tmp_path / "b.jsonl", "--decoder", str(decoder_dir)) == 0
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()

    # A missing checkpoint or another decoder: one line on stderr, exit status 2.
    capsys.readouterr()
    assert run(tmp_path / "nowhere", tmp_path / "c.jsonl") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load the encoder") and err.count("\n") == 1
    other = write_decoder(tmp_path / "other", seed=1)
    assert run(exported, tmp_path / "c.jsonl", "--decoder", str(other)) == 2
    assert "weights hash" in capsys.readouterr().err


def test_a_checkpoint_trained_with_a_relative_decoder_path_encodes_from_any_directory(tmp_path, monkeypatch):
    """Issue 17 #4: the decoder path is recorded absolute; another location is given with --decoder
    (test_cli_reads_a_checkpoint_and_its_exported_folder: its weights hash is checked)."""
    from dediffusion_jax.train import checkpoint as ckpt_lib

    write_decoder(tmp_path / "decoder", seed=0)
    monkeypatch.chdir(tmp_path)
    decoder = folder.load_decoder("decoder")  # relative, as a user may type it
    assert ckpt_lib.decoder_info(decoder)["path"] == str(tmp_path / "decoder")
    workdir = write_checkpoint(tmp_path / "run", Path("decoder"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    write_pngs(elsewhere / "imgs", 2)
    assert encode.main(["--checkpoint", str(workdir), "--images", "imgs", "--out", "t.jsonl",
                        "--no-progress"]) == 0
    assert len((elsewhere / "t.jsonl").read_text().splitlines()) == 2
