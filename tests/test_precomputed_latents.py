"""Precomputed latents (issue 21): encode a dataset ONCE into (backbone view, VAE posterior) records,
then train from `latents:DIR` without the VAE in the step.

The examples use a tiny random Stable-Diffusion-like decoder (sd1 family: text encoder, UNet and a
VAE, 16 px images -> 8x8x4 latents) and a folder of 12 small PNGs, encoded in shards of 5 records.
The latent path draws eps from the same key as the in-step encode, so the two paths give the same
loss; what is left is the storage precision (measured below).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from dediffusion_jax import encode_latents as encode_lib
from dediffusion_jax.data import latents as latents_lib
from dediffusion_jax.models.dediffusion import UNET_INPUT_GRAD_KERNELS
from dediffusion_jax.parallel.mesh import make_mesh
from dediffusion_jax.t2i import folder
from dediffusion_jax.train import cli, loop
from helpers import tiny_decoder as tiny
from projects.miniworld import tokenizer as world_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORLD = f"{REPO}/projects/miniworld/configs/world.py"
NUM_IMAGES, SHARD = 12, 5  # shards of 5, 5 and 2 records
STEPS = 3
TINY = {  # projects/miniworld/configs/world.py made small, as tests/test_train_loop.py does
    "backbone.overrides.hidden_size": 32, "backbone.overrides.num_layers": 1,
    "backbone.overrides.num_heads": 2, "backbone.overrides.mlp_dim": 64,
    "encoder.num_queries": 6, "encoder.pooler_blocks": 1, "encoder.pooler_width": 32,
    "encoder.pooler_heads": 2, "batch_size": 8, "total_steps": STEPS, "lr.warmup_steps": 1,
    "checkpoint.every_steps": STEPS, "log.samples_every": 0, "log.progress_every": 1,
    "log.tensorboard": False,
}


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    return tiny.save_random_decoder("sd1", tmp_path_factory.mktemp("decoder") / "sd1",
                                    world_tokenizer.DEFAULT_DIR, seed=0)


@pytest.fixture(scope="module")
def decoder(decoder_dir):
    return folder.load_decoder(decoder_dir)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):  # 20x24: the views are a center crop, resized to 16x16
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


def config_for(decoder_dir: Path, source: str):
    config = cli.load_config_file(f"{WORLD}:decoder={decoder_dir},eval_every=0")
    config.update_from_flattened_dict({**TINY, "data.source": source})
    return config


@pytest.fixture(scope="module")
def encoded(decoder_dir, decoder, images_dir, tmp_path_factory) -> dict[str, Path]:
    """The image folder encoded three times: everything in float32, the defaults (float32 posterior,
    float16 views) and everything in float16."""
    out = {}
    config = config_for(decoder_dir, f"folder:{images_dir}")
    for name, dtypes in {"float32": ("float32", "float32"), "default": ("float32", "float16"),
                         "float16": ("float16", "float16")}.items():
        out[name] = tmp_path_factory.mktemp("latents") / name
        encode_lib.encode_latents(config, out[name], decoder=decoder, shard_size=SHARD, batch_size=8,
                                  latent_dtype=dtypes[0], backbone_dtype=dtypes[1])
    return out


def losses(workdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_a_latents_folder_holds_the_views_and_posteriors_of_every_image(encoded, decoder_dir, decoder,
                                                                        images_dir):
    manifest = latents_lib.read_manifest(encoded["default"])
    assert manifest["complete"] and manifest["records"] == NUM_IMAGES and manifest["skipped"] == 0
    assert [(s["file"], s["records"]) for s in manifest["shards"]] == [
        ("latents-00000.array_record", 5), ("latents-00001.array_record", 5),
        ("latents-00002.array_record", 2)]
    assert manifest["decoder"]["identity"] == decoder.identity
    assert manifest["data_source"] == f"folder:{images_dir}"
    assert manifest["shapes"] == {"backbone": [16, 16, 3], "latent": [8, 8, 4]}
    source = latents_lib.LatentsSource(encoded["default"])
    first = source[0]
    assert first["id"] == "img00.png" and first["backbone"].dtype == np.float16
    assert first["latent_mean"].dtype == np.float32 and first["latent_logvar"].shape == (8, 8, 4)
    # The stored backbone view is the trainer's own (world backbone: (x/255 - 0.5) / 0.5), in float16.
    config = config_for(decoder_dir, f"folder:{images_dir}")
    _, preprocess_fn = loop.source_and_preprocess(config, decoder)
    view = preprocess_fn({"id": "img00.png", "image": (images_dir / "img00.png").read_bytes()})["backbone"]
    np.testing.assert_allclose(first["backbone"], view, atol=1e-3)  # float16: 2^-11 of |x| <= 1


@pytest.mark.slow  # four 3-step runs, two step compiles: 18 s warm, 51 s cold
def test_training_from_latents_gives_the_image_sources_losses(encoded, decoder_dir, decoder, images_dir,
                                                               tmp_path):
    """3 steps from the images (VAE encode in the step) and from the latents (no VAE in the step), the
    same seed: the same batches and the same eps, so the same losses up to storage precision."""
    runs = {"images": f"folder:{images_dir}", **{k: f"latents:{v}" for k, v in encoded.items()}}
    got = {}
    for name, source in runs.items():
        loop.train_and_evaluate(config_for(decoder_dir, source), tmp_path / name, decoder=decoder)
        got[name] = np.asarray(losses(tmp_path / name))
    assert len(got["images"]) == STEPS and np.all(np.isfinite(got["images"]))
    # All float32: at most the VAE's float rounding (another batch layout) could differ; measured 0.0.
    np.testing.assert_allclose(got["float32"], got["images"], rtol=1e-5)
    # float16 backbone views (the default): the encoder sees views rounded to 2^-11 relative; float16
    # posteriors too: the latent is rounded as well. Measured (2026-12-06): 4.0e-6 and 3.8e-6 relative
    # at most over the 3 steps (docs/training.md has the same with the world's trained VAE).
    np.testing.assert_allclose(got["default"], got["images"], rtol=1e-4)
    np.testing.assert_allclose(got["float16"], got["images"], rtol=1e-3)
    print({k: float(np.abs(v / got["images"] - 1).max()) for k, v in got.items()})


def test_the_latent_run_keeps_the_vae_out_of_the_step(encoded, decoder_dir, decoder, tmp_path):
    config = config_for(decoder_dir, f"latents:{encoded['default']}")
    task = loop.de_diffusion_task(config, decoder, iter(()), make_mesh({"data": -1}), tmp_path)
    assert set(task.example_batch) == {"backbone", "latent_mean", "latent_logvar"}
    assert task.example_batch["latent_mean"].shape == (8, 8, 8, 4)
    # The VAE stays off the devices; beside the text encoder and UNet, only the UNet's kernels flipped
    # for its input gradient (config decoder.flip_conv_kernels, on by default on CPU).
    assert set(task.frozen["decoder"]) == {"text_encoder", "unet", UNET_INPUT_GRAD_KERNELS}


def test_the_sharded_encode_equals_the_one_device_encode(decoder_dir, decoder, images_dir, tmp_path):
    config = config_for(decoder_dir, f"folder:{images_dir}")
    kw = dict(decoder=decoder, shard_size=SHARD, batch_size=8, latent_dtype="float32",
              backbone_dtype="float32", max_shards=1)
    assert jax.device_count() == 8  # conftest: 8 fake CPU devices
    encode_lib.encode_latents(config, tmp_path / "eight", mesh=make_mesh({"data": -1}), **kw)
    encode_lib.encode_latents(config, tmp_path / "one", mesh=make_mesh({"data": 1}, jax.devices()[:1]), **kw)
    records = {name: latents_lib.read_records(tmp_path / name / latents_lib.shard_name(0))
               for name in ("eight", "one")}
    assert len(records["eight"]) == len(records["one"]) == SHARD
    for a, b in zip(records["eight"], records["one"]):
        assert a["id"] == b["id"]
        np.testing.assert_array_equal(a["backbone"], b["backbone"])  # made on the host
        for key in ("latent_mean", "latent_logvar"):  # XLA's float rounding per layout: ~1e-6 seen
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_a_rerun_skips_finished_shards_and_an_unfinished_folder_is_refused(
        decoder_dir, images_dir, tmp_path, capsys):
    out = tmp_path / "latents"
    argv = ["--config", f"{WORLD}:decoder={decoder_dir},eval_every=0",
            f"--config.data.source=folder:{images_dir}", "--out", str(out), "--shard-size", str(SHARD),
            "--batch-size", "8"]
    # An interrupted encode: one shard finished, a second one half-written under its temp name.
    config = cli.config_from_argv(argv[1], argv)
    encode_lib.encode_latents(config, out, shard_size=SHARD, batch_size=8, max_shards=1)
    (out / (latents_lib.shard_name(1) + ".tmp")).write_bytes(b"cut short")
    first = (out / latents_lib.shard_name(0)).stat().st_mtime_ns
    with pytest.raises(latents_lib.LatentsError, match="unfinished .1 of 3 shards.*run python -m "
                                                       "dediffusion_jax.encode_latents again"):
        latents_lib.LatentsSource(out)
    capsys.readouterr()

    assert encode_lib.main(argv) == 0  # the command, as a user reruns it
    err = capsys.readouterr().err
    assert "1 finished, 2 to encode" in err and "records/s" in err
    assert (out / latents_lib.shard_name(0)).stat().st_mtime_ns == first  # not rewritten
    assert sorted(p.name for p in out.iterdir()) == [
        "latents-00000.array_record", "latents-00001.array_record", "latents-00002.array_record",
        "manifest.json"]
    assert len(latents_lib.LatentsSource(out)) == NUM_IMAGES
    assert encode_lib.main(argv) == 0 and "0 to encode" in capsys.readouterr().err


def test_another_decoder_is_refused_by_the_encode_and_by_the_trainer(encoded, decoder_dir, images_dir,
                                                                      tmp_path, capsys):
    other = tiny.save_random_decoder("sd1", tmp_path / "other", world_tokenizer.DEFAULT_DIR, seed=1)
    # Adding to the folder with another decoder: one line, exit status 2.
    argv = ["--config", f"{WORLD}:decoder={other},eval_every=0", f"--config.data.source=folder:{images_dir}",
            "--out", str(encoded["default"]), "--shard-size", str(SHARD), "--batch-size", "8"]
    assert encode_lib.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {encoded['default']} holds latents of another encode "
                              "(decoder.identity: ")
    # Training from the folder with another decoder: one line, exit status 2, nothing trained.
    config = config_for(other, f"latents:{encoded['default']}")
    assert cli.run_training(config, str(tmp_path / "run")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: latents folder {encoded['default']} was encoded with decoder ")
    assert "re-encode with python -m dediffusion_jax.encode_latents" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
