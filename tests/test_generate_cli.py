"""`python -m dediffusion_jax.generate`, run in-process on a tiny pixel-space decoder folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dediffusion_jax import generate
from projects.miniworld.tokenizer import DEFAULT_DIR as TOKENIZER_DIR
from dediffusion_jax.parallel.mesh import make_mesh
from dediffusion_jax.t2i import pipeline
from dediffusion_jax.t2i.folder import load_decoder, save_decoder
from helpers import tiny_decoder as tiny

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    decoder = tiny.random_decoder("pixel", TOKENIZER_DIR, seed=0)
    return save_decoder(decoder, tmp_path_factory.mktemp("cli") / "pixel_decoder")


def test_writes_one_png_per_prompt_and_the_prompt_list(decoder_dir, tmp_path, capsys):
    out = tmp_path / "images"
    argv = ["--decoder", str(decoder_dir), "--steps", "2", "--batch-size", "2", "--seed", "3",
            "--out", str(out)]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert generate.main(argv) == 0

    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "prompts.txt"]
    assert (out / "prompts.txt").read_text().splitlines() == PROMPTS
    images = [np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(2)]
    for image in images:
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8  # the decoder's image_size
    assert "wrote 2 images" in capsys.readouterr().out

    # The PNGs are generate()'s images (same seed, same mesh and batch as the CLI uses).
    want = pipeline.generate(load_decoder(decoder_dir), PROMPTS, num_steps=2, seed=3,
                             batch_size=2, mesh=make_mesh({"data": -1}))
    np.testing.assert_array_equal(np.stack(images), want)


def test_prompt_file(decoder_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na dog\n")  # blank lines are skipped
    out = tmp_path / "images"
    argv = ["--decoder", str(decoder_dir), "--prompt-file", str(prompts), "--steps", "2",
            "--batch-size", "2", "--seed", "3", "--out", str(out)]
    assert generate.main(argv) == 0
    assert (out / "prompts.txt").read_text().splitlines() == ["a red circle", "a dog"]
    assert (out / "00001.png").is_file() and not (out / "00002.png").exists()


def test_no_prompt_is_a_usage_error(decoder_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(["--decoder", str(decoder_dir), "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "give at least one --prompt or a --prompt-file" in capsys.readouterr().err


def test_missing_prompt_file_is_a_usage_error(decoder_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(["--decoder", str(decoder_dir), "--prompt-file", str(tmp_path / "no.txt"),
                       "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "no.txt does not exist" in capsys.readouterr().err


def test_missing_decoder_folder_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "no_such_decoder"
    rc = generate.main(["--decoder", str(missing), "--prompt", "a dog", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err
    assert not any(tmp_path.glob("*.png"))


def test_mismatched_checkpoint_exits_2_naming_the_key(decoder_dir, tmp_path, capsys):
    import shutil

    broken = shutil.copytree(decoder_dir, tmp_path / "broken")
    config_path = broken / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_size"] = 48  # the checkpoint's MLPs are 64 wide
    config_path.write_text(json.dumps(config))
    rc = generate.main(["--decoder", str(broken), "--prompt", "a dog", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "text_model.encoder.layers.0.mlp.fc1.weight" in err and "Traceback" not in err
