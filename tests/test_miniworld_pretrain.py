"""The world decoder's pre-training script: a few steps, an exact resume, and the exported folder."""

from __future__ import annotations

import json

import numpy as np
import safetensors.numpy

from dediffusion_jax.miniworld import pretrain_decoder, tokenizer as world_tokenizer
from dediffusion_jax.t2i import folder


def test_the_batch_of_a_step_is_a_pure_function_of_seed_and_step():
    tok = world_tokenizer.load_tokenizer()
    a = pretrain_decoder.batch_for_step(0, 7, 4, tok)
    b = pretrain_decoder.batch_for_step(0, 7, 4, tok)
    c = pretrain_decoder.batch_for_step(0, 8, 4, tok)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_train_resume_and_export_a_loadable_float16_folder(tmp_path, capsys):
    workdir, out = tmp_path / "run", tmp_path / "decoder"
    common = ["--workdir", str(workdir), "--batch", "4", "--eval-every", "0", "--log-every", "1"]
    assert pretrain_decoder.main(common + ["--steps", "2"]) == 0
    first = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first] == [1, 2] and all(np.isfinite(r["loss"]) for r in first)

    # A second phase (here with word-soup captions) resumes at step 2; both phases are recorded.
    assert pretrain_decoder.main(common + ["--steps", "3", "--soup-fraction", "0.25"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    assert json.loads((workdir / "args.json").read_text())["steps"] == 3

    assert pretrain_decoder.main(["--workdir", str(workdir), "--export", str(out), "--eval-every", "0"]) == 0
    info = json.loads((out / "TRAINING.json").read_text())
    assert info["steps"] == 3 and info["weights_dtype"] == "float16" and info["args"]["steps"] == 3
    assert [(a["steps"], a["soup_fraction"]) for a in info["args_history"]] == [(2, 0.0), (3, 0.25)]
    weights = safetensors.numpy.load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {np.dtype(np.float16)}
    assert any(k.endswith("pos_embed") for k in weights) and "add_embedding.pool.positional_embedding" in weights
    decoder = folder.load_decoder(out)
    assert decoder.unet_config.addition_embed_type == "text" and decoder.unet_config.attention_position_embedding
    assert decoder.sample_shape == (16, 16, 3) and decoder.schedule.prediction_type == "v_prediction"
    assert not decoder.schedule.clip_sample  # x0 clipping with guidance wrecked the samples


def test_export_without_a_checkpoint_is_an_error(tmp_path, capsys):
    assert pretrain_decoder.main(["--workdir", str(tmp_path / "empty"), "--export", str(tmp_path / "d")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
