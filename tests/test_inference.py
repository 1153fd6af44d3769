"""The inference API: a trained run -> `TextEncoder` -> token ids and texts; export and reload.

One short training run (the world config, tiny, on a random tiny decoder) is shared by the tests. Its
encoder is loaded the way users load it (`TextEncoder.from_checkpoint`), compared with the training
program's own restore of the same checkpoint, exported, and loaded back without the workdir.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dediffusion_jax.inference import CheckpointError, DecoderMismatchError, TextEncoder
from dediffusion_jax.t2i import folder
from projects.miniworld import scenes
from test_train_loop import tiny_config, write_decoder

REPO = Path(__file__).resolve().parents[1]
STEPS = 4  # checkpoints at 2 and 4


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(workdir of a finished 4-step run, its decoder folder)."""
    from dediffusion_jax.train import loop

    root = tmp_path_factory.mktemp("inference")
    decoder_dir = write_decoder(root / "decoder", seed=0)
    config = tiny_config(decoder_dir, **{"total_steps": STEPS, "checkpoint.every_steps": 2,
                                         "log.samples_every": 0, "log.tensorboard": False})
    loop.train_and_evaluate(config, root / "run")
    return root / "run", decoder_dir


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return scenes.images_of(scenes.split_indices("heldout")[:5])


@pytest.fixture(scope="module")
def encoder(run) -> TextEncoder:
    return TextEncoder.from_checkpoint(run[0], batch_size=4)  # 5 images: a padded second batch


def test_importing_inference_leaves_out_optax_grain_and_the_train_loop():
    code = ("import sys, dediffusion_jax.inference\n"
            "print([m for m in ('optax', 'grain', 'dediffusion_jax.train.loop') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_from_checkpoint_gives_the_ids_of_the_training_model(run, encoder, images):
    from dediffusion_jax.train import checkpoint as ckpt_lib
    from dediffusion_jax.train import loop

    workdir, decoder_dir = run
    # The training program's own view of the latest checkpoint: build_parts + restore of the state.
    decoder = folder.load_decoder(decoder_dir)
    parts = loop.build_parts(encoder.config, decoder)
    manager = ckpt_lib.make_manager(workdir, async_save=False)
    try:
        state = ckpt_lib.restore(manager, STEPS, parts.abstract_state, None)
    finally:
        manager.close()
    frozen = parts.frozen_params()
    want = np.asarray(jax.jit(parts.model.token_ids)(state.params, frozen, images))

    ids = encoder.token_ids(images)
    assert ids.shape == (5, 6) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, want)
    texts = encoder.texts(images)
    assert texts == parts.model.texts(want) == encoder.texts_of_ids(ids)
    assert all(isinstance(t, str) for t in texts)
    assert encoder.config.total_steps == STEPS and encoder.decoder.identity == decoder.identity
    assert encoder.key.endswith(f"step={STEPS}")

    # A specific step is that step's checkpoint (trained params differ from the latest).
    earlier = TextEncoder.from_checkpoint(workdir / "checkpoints" / "2", decoder=decoder)
    diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                        earlier.trainable, encoder.trainable)
    assert max(jax.tree.leaves(diff)) > 0


def test_export_then_from_pretrained_without_the_workdir(run, encoder, images, tmp_path):
    workdir, decoder_dir = run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    exported = TextEncoder.from_checkpoint(copy).export(tmp_path / "exported")
    shutil.rmtree(copy)  # the export needs nothing of the workdir

    meta = json.loads((exported / "config.json").read_text())
    assert meta["decoder"]["identity"] == encoder.decoder.identity
    assert meta["decoder"]["path"] == str(decoder_dir)
    assert (exported / "tokenizer" / "vocab.json").is_file()
    # The frozen, pre-trained backbone travels in the folder, not by its path.
    assert encoder.config.backbone.frozen and encoder.config.backbone.init

    again = TextEncoder.from_pretrained(exported, batch_size=3)
    np.testing.assert_array_equal(again.token_ids(images), encoder.token_ids(images))
    assert again.texts(images) == encoder.texts(images)
    # `load` picks the loader; a decoder given by path (the same weights elsewhere) is accepted.
    moved = shutil.copytree(decoder_dir, tmp_path / "moved_decoder")
    by_path = TextEncoder.load(exported, decoder=moved)
    np.testing.assert_array_equal(by_path.token_ids(images), encoder.token_ids(images))

    other = write_decoder(tmp_path / "other_decoder", seed=1)
    with pytest.raises(DecoderMismatchError, match="weights hash"):
        TextEncoder.from_pretrained(exported, decoder=other)
    with pytest.raises(DecoderMismatchError, match="weights hash"):
        TextEncoder.from_checkpoint(workdir, decoder=folder.load_decoder(other))


def _one_line_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        TextEncoder.load(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_missing_mistyped_and_corrupt_checkpoints_are_one_line_errors(run, tmp_path):
    workdir, decoder_dir = run
    assert "neither a run workdir" in _one_line_error(tmp_path / "nowhere")
    assert "neither a run workdir" in _one_line_error(decoder_dir)  # a decoder, not a run
    assert "no checkpoint folder" in _one_line_error(workdir / "checkpoints" / "3")

    broken = shutil.copytree(workdir, tmp_path / "broken")
    for f in (broken / "checkpoints/4/state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage" * 3)
    assert "cannot restore the encoder params of checkpoint step 4" in _one_line_error(broken)
    (broken / "checkpoints/2/config/metadata").write_text("{not json")
    assert "cannot read the config of checkpoint step 2" in _one_line_error(
        broken / "checkpoints" / "2")

    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "config.json").write_text("{}")
    (exported / "model.safetensors").write_bytes(b"garbage")
    assert "config.json" in _one_line_error(exported)
