"""The world decoder's pre-training script: a few steps, an exact resume, and the exported folder."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import safetensors.numpy

from projects.miniworld import pretrain_decoder, tokenizer as world_tokenizer
from dediffusion_jax.t2i import folder
from helpers import tiny_decoder as tiny


def test_the_batch_of_a_step_is_a_pure_function_of_seed_and_step():
    tok = world_tokenizer.load_tokenizer()
    a = pretrain_decoder.batch_for_step(0, 7, 4, tok)
    b = pretrain_decoder.batch_for_step(0, 7, 4, tok)
    c = pretrain_decoder.batch_for_step(0, 8, 4, tok)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


@pytest.mark.slow  # a minute or more of training runs on 2 cores: .ci/run's slow phase
def test_train_resume_and_export_a_loadable_float16_folder(tmp_path, capsys):
    workdir, out = tmp_path / "run", tmp_path / "decoder"
    common = ["--workdir", str(workdir), "--batch", "4", "--eval-every", "0", "--log-every", "1"]
    assert pretrain_decoder.main(common + ["--steps", "2"]) == 0
    first = [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in first] == [1, 2] and all(np.isfinite(r["loss"]) for r in first)

    # A second phase (here with word-soup captions) resumes at step 2, its changes named; both phases
    # are recorded.
    assert pretrain_decoder.main(common + ["--steps", "3", "--soup-fraction", "0.25",
                                           "--allow-changes", "steps,soup_fraction"]) == 0
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


def test_token_mixing_blends_only_world_words_and_is_off_at_zero():
    tok = world_tokenizer.load_tokenizer()
    _, ids = pretrain_decoder.batch_for_step(0, 7, 64, tok, 0.25)
    other, w = pretrain_decoder.token_mixing_for_step(0, 7, ids, 1.0, tok)
    again = pretrain_decoder.token_mixing_for_step(0, 7, ids, 1.0, tok)
    np.testing.assert_array_equal(w, again[1])
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, *world_tokenizer.punctuation_token_ids(tok)}
    assert (w[np.isin(ids, list(special))] == 0).all()  # never SOS/EOS/pad or punctuation
    assert 0.3 < (w > 0).sum() / (~np.isin(ids, list(special))).sum() < 0.7  # p_token = 0.5 of the words
    assert ((0 <= w) & (w < 1)).all()
    vocab = set(world_tokenizer.word_token_ids(tok).values())
    assert set(np.unique(other[w > 0])) <= vocab
    assert not pretrain_decoder.token_mixing_for_step(0, 7, ids, 0.0, tok)[1].any()


@pytest.mark.slow  # ~30-70 s on 2 cores: .ci/run's slow phase keeps the default run under 20 min
def test_a_fine_tune_starts_from_the_folder_and_unmixed_embeddings_equal_the_ids_path(tmp_path):
    import argparse

    import jax.numpy as jnp

    committed = "projects/miniworld/assets/decoder"
    args = argparse.Namespace(seed=0, lr=1e-4, lr_end=1e-5, warmup=1, steps=2, batch=4, soup_fraction=0.0,
                              mix_fraction=0.3, init_from=committed)
    trainer = pretrain_decoder.Trainer(args)
    state = trainer.init_state()
    loaded = folder.load_decoder(committed).params
    np.testing.assert_array_equal(np.asarray(state["params"]["unet"]["conv_in"]["kernel"]),
                                  np.asarray(loaded["unet"]["conv_in"]["kernel"]))
    _, ids = pretrain_decoder.batch_for_step(0, 0, 4, trainer.tokenizer)
    ids = jnp.asarray(ids)
    plain = trainer.text_states(state["params"], ids, None)
    unmixed = trainer.text_states(state["params"], ids, (ids, jnp.zeros(ids.shape, jnp.float32)))
    np.testing.assert_allclose(np.asarray(unmixed), np.asarray(plain), atol=1e-6)
    state, metrics = trainer.step(state, 0)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) < 0.2  # a trained decoder's loss

    # A decoder folder of another architecture is refused, naming what differs.
    folder.save_decoder(tiny.random_decoder("pixel", world_tokenizer.DEFAULT_DIR, seed=0), tmp_path / "tiny")
    wrong = argparse.Namespace(**{**vars(args), "init_from": str(tmp_path / "tiny")})
    with pytest.raises(folder.DecoderFolderError, match="differ from this script"):
        pretrain_decoder.Trainer(wrong).init_state()


@pytest.mark.slow  # the default run stayed over 20 min on a slower 2-core machine (2026-12-07): .ci/run's slow phase runs it
def test_a_frozen_world_clip_text_encoder_stays_out_of_the_optimizer(tmp_path):
    import argparse

    backbone = "projects/miniworld/assets/backbone"
    args = argparse.Namespace(seed=0, lr=1e-3, lr_end=1e-5, warmup=1, steps=2, batch=4, soup_fraction=0.0,
                              mix_fraction=0.0, init_from=None, text_encoder_from=backbone,
                              freeze_text_encoder=True)
    trainer = pretrain_decoder.Trainer(args)
    state = trainer.init_state()
    tower = pretrain_decoder.text_tower_of(backbone, trainer.text_config)
    before_text = jax.tree_util.tree_map(np.asarray, state["params"]["text_encoder"])
    before_unet = np.asarray(state["params"]["unet"]["conv_in"]["kernel"]).copy()
    for got, want in zip(jax.tree_util.tree_leaves(before_text), jax.tree_util.tree_leaves(tower)):
        np.testing.assert_array_equal(got, np.asarray(want))
    # The optimizer holds moments for the UNet only.
    adam = state["opt_state"][1]  # chain(clip, scale_by_adam, scale_by_learning_rate)
    assert set(adam.mu) == set(adam.nu) == {"unet"}

    for step in range(2):
        state, metrics = trainer.step(state, step)
    assert np.isfinite(float(metrics["loss"]))
    for got, want in zip(jax.tree_util.tree_leaves(state["params"]["text_encoder"]),
                         jax.tree_util.tree_leaves(before_text)):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert not np.array_equal(np.asarray(state["params"]["unet"]["conv_in"]["kernel"]), before_unet)


def test_a_text_tower_that_does_not_fit_is_refused_with_the_reason(tmp_path):
    trainer_config = pretrain_decoder.build_configs(world_tokenizer.load_tokenizer())[0]
    with pytest.raises(FileNotFoundError, match="config.json"):
        pretrain_decoder.text_tower_of(tmp_path, trainer_config)
    config = json.loads(open("projects/miniworld/assets/backbone/config.json").read())
    config["text_config"]["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(
        open("projects/miniworld/assets/backbone/model.safetensors", "rb").read())
    with pytest.raises(pretrain_decoder.TextTowerError, match="num_hidden_layers"):
        pretrain_decoder.text_tower_of(tmp_path, trainer_config)


@pytest.mark.slow  # a minute or more of training runs on 2 cores: .ci/run's slow phase
def test_resuming_with_the_other_freeze_setting_is_an_error(tmp_path, capsys):
    common = ["--workdir", str(tmp_path / "run"), "--batch", "2", "--eval-every", "0", "--steps", "1"]
    assert pretrain_decoder.main(common) == 0
    assert pretrain_decoder.main(common + ["--steps", "2", "--freeze-text-encoder"]) == 2
    assert "freeze_text_encoder=False" in capsys.readouterr().err


@pytest.mark.slow  # about 35 s of training on 2 cores: .ci/run's slow phase
def test_a_run_with_a_frozen_text_encoder_exports_that_encoder(tmp_path):
    backbone = "projects/miniworld/assets/backbone"
    workdir, out = tmp_path / "run", tmp_path / "decoder"
    assert pretrain_decoder.main(["--workdir", str(workdir), "--batch", "2", "--eval-every", "0", "--steps", "1",
                                  "--text-encoder-from", backbone, "--freeze-text-encoder"]) == 0
    # The export rebuilds the run's state layout (no text-encoder optimizer state) from its record.
    assert pretrain_decoder.main(["--workdir", str(workdir), "--export", str(out), "--eval-every", "0",
                                  "--export-dtype", "float32"]) == 0
    exported = folder.load_decoder(out, load_vae=False).params["text_encoder"]
    tower = pretrain_decoder.text_tower_of(backbone, folder.load_decoder(out, load_vae=False).text_config)
    for got, want in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(tower)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow  # a minute or more of training runs on 2 cores: .ci/run's slow phase
def test_a_stopped_run_resumes_exactly_on_the_spine(tmp_path):
    """Stopped after 1 step and resumed, a run's losses and exported EMA weights equal an uninterrupted
    run's; the checkpoint is the spine's (state, data position, the run's args)."""
    common = ["--batch", "2", "--eval-every", "0", "--log-every", "1", "--steps", "3", "--mix-fraction", "0.3"]
    assert pretrain_decoder.main(common + ["--workdir", str(tmp_path / "ref")]) == 0
    assert pretrain_decoder.main(common + ["--workdir", str(tmp_path / "run"), "--stop-after-steps", "1"]) == 0
    step1 = tmp_path / "run" / "checkpoints" / "1"
    assert {"state", "data", "args"} <= {p.name for p in step1.iterdir()}
    assert json.loads((step1 / "data" / "process_0-of-1.json").read_text()) == {"step": 1}
    assert pretrain_decoder.main(common + ["--workdir", str(tmp_path / "run")]) == 0

    def losses(workdir):
        return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    assert losses(tmp_path / "run") == losses(tmp_path / "ref") and sorted(losses(tmp_path / "ref")) == [1, 2, 3]
    for name in ("ref", "run"):
        assert pretrain_decoder.main(["--workdir", str(tmp_path / name), "--export", str(tmp_path / f"{name}_out"),
                                      "--eval-every", "0", "--export-dtype", "float32"]) == 0
    ref = safetensors.numpy.load_file(str(tmp_path / "ref_out" / "unet" / "diffusion_pytorch_model.safetensors"))
    got = safetensors.numpy.load_file(str(tmp_path / "run_out" / "unet" / "diffusion_pytorch_model.safetensors"))
    for k in ref:
        np.testing.assert_array_equal(ref[k], got[k], err_msg=k)


@pytest.mark.slow  # a minute or more of training runs on 2 cores: .ci/run's slow phase
def test_a_resume_with_other_training_arguments_is_refused_unless_allowed(tmp_path, capsys):
    common = ["--workdir", str(tmp_path / "run"), "--batch", "2", "--eval-every", "0"]
    assert pretrain_decoder.main(common + ["--steps", "1"]) == 0
    capsys.readouterr()
    assert pretrain_decoder.main(common + ["--steps", "2", "--lr", "5e-4", "--log-every", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "lr" in err and "steps" in err and "--allow-changes" in err
    assert "log_every" not in err  # how often to log is free
    assert pretrain_decoder.main(common + ["--steps", "2", "--lr", "5e-4", "--allow-changes", "steps,lr"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
