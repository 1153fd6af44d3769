"""Diffusers-format decoder folders: torch-written folders load, our writer round-trips, bad input fails.

The reference folders are written by transformers/diffusers themselves (`tiny.write_reference_folder`:
each component's `save_pretrained(safe_serialization=True)` with every weight perturbed), so nothing
here trusts our own writer to check our reader. Then `load_decoder -> save_decoder -> from_pretrained`
must give back tensors identical to the originals, and the loaded Flax modules must compute what the
torch ones compute.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.miniworld.tokenizer import DEFAULT_DIR as TOKENIZER_DIR
from dediffusion_jax.t2i import clip_text, convert, folder
from dediffusion_jax.t2i.folder import DecoderFolderError, load_decoder, save_decoder
from helpers import tiny_decoder as tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

MODEL_CLASSES = {
    "text_encoder": transformers.CLIPTextModel,
    "unet": diffusers.UNet2DConditionModel,
    "vae": diffusers.AutoencoderKL,
}
PROMPTS = ["a red circle", "two blue squares on the left, small", ""]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a training job shares the 2 cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["sd1", "pixel"])
def reference(request, tmp_path_factory):
    """(family, folder written by torch, the torch components, our load_decoder of it)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"torch_{family}")
    models = tiny.write_reference_folder(family, root, TOKENIZER_DIR, seed=1)
    return family, root, models, load_decoder(root)


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_sd1_for_errors")
    tiny.write_reference_folder("sd1", root, TOKENIZER_DIR, seed=2)
    return root


@pytest.fixture
def broken(sd1_folder, tmp_path):
    """A private copy of a good sd1 folder for a test to damage."""
    return Path(shutil.copytree(sd1_folder, tmp_path / "decoder"))


def _strip_prefix(state: dict) -> dict:
    """transformers 5 drops CLIPTextModel's `text_model.` key prefix; 4.x (and our writer) keep it."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


# ------------------------------------------------------------------------------------------------
# Loading and round trip


def test_load_reads_configs_and_geometry(reference):
    family, _, models, decoder = reference
    assert decoder.is_latent == (family == "sd1")
    assert set(decoder.params) == ({"text_encoder", "unet", "vae"} if family == "sd1"
                                   else {"text_encoder", "unet"})
    assert decoder.context_length == 16
    assert decoder.text_config.vocab_size == len(models["tokenizer"]) == 606
    if family == "sd1":
        assert decoder.sample_shape == (8, 8, 4) and decoder.image_size == 16
    else:
        assert decoder.sample_shape == (16, 16, 3) and decoder.image_size == 16
    assert decoder.schedule.prediction_type == models["scheduler"].config.prediction_type


def test_float16_weights_halve_the_files_and_load_back_as_float32(reference, tmp_path):
    family, root, _, decoder = reference
    half = save_decoder(decoder, tmp_path / "half", weights_dtype=np.float16)
    full = save_decoder(decoder, tmp_path / "full")
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    assert (half / unet_file).stat().st_size < 0.55 * (full / unet_file).stat().st_size
    again = load_decoder(half)
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(decoder.params)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="weights_dtype must be float32 or float16"):
        save_decoder(decoder, tmp_path / "bad", weights_dtype=np.int8)


@pytest.mark.parity
def test_save_round_trip_gives_identical_torch_tensors(reference, tmp_path):
    """The issue's requirement: torch folder -> load_decoder -> save_decoder -> from_pretrained."""
    family, _, models, decoder = reference
    out = save_decoder(decoder, tmp_path / "ours")
    assert (out / "model_index.json").is_file()
    assert (out / "vae").is_dir() == (family == "sd1")
    for name, cls in MODEL_CLASSES.items():
        if models[name] is None:
            continue
        original = _strip_prefix(models[name].state_dict())
        reloaded = _strip_prefix(cls.from_pretrained(str(out / name)).state_dict())
        assert sorted(reloaded) == sorted(original), name
        for key, tensor in original.items():
            assert reloaded[key].dtype == tensor.dtype, f"{name}: {key}"
            assert torch.equal(reloaded[key], tensor), f"{name}: {key} differs after the round trip"

    scheduler = diffusers.DDIMScheduler.from_pretrained(str(out / "scheduler"))
    want = {k: v for k, v in models["scheduler"].config.items() if not k.startswith("_")}
    got = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    assert got == want
    for sched in (scheduler, models["scheduler"]):
        sched.set_timesteps(4)
    assert torch.equal(scheduler.timesteps, models["scheduler"].timesteps)

    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tokenizer.model_max_length == 16
    assert tokenizer(PROMPTS)["input_ids"] == models["tokenizer"](PROMPTS)["input_ids"]


@pytest.mark.parity
def test_loaded_modules_compute_what_torch_computes(reference):
    family, _, models, decoder = reference
    ids = models["tokenizer"](PROMPTS, padding="max_length", max_length=16)["input_ids"]
    ids = np.asarray(ids, np.int32)
    with torch.no_grad():
        want_text = models["text_encoder"](torch.from_numpy(ids).long()).last_hidden_state.numpy()
    got_text = decoder.text_encoder.apply(
        {"params": decoder.params["text_encoder"]}, input_ids=ids
    ).last_hidden_state
    np.testing.assert_allclose(np.asarray(got_text), want_text, atol=2e-5, rtol=1e-5)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(PROMPTS), *decoder.sample_shape)).astype(np.float32)  # NHWC
    t = np.array([999, 500, 3], np.int32)
    with torch.no_grad():
        want_eps = models["unet"](
            torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long(),
            encoder_hidden_states=torch.from_numpy(want_text),
        ).sample.numpy().transpose(0, 2, 3, 1)
    got_eps = decoder.unet.apply({"params": decoder.params["unet"]}, x, t, want_text)
    np.testing.assert_allclose(np.asarray(got_eps), want_eps, atol=1e-4, rtol=1e-4)

    if family == "sd1":
        from dediffusion_jax.t2i import vae as vae_lib

        with torch.no_grad():
            want_img = models["vae"].decode(
                torch.from_numpy(x.transpose(0, 3, 1, 2)) / 0.18215
            ).sample.numpy().transpose(0, 2, 3, 1)
        got_img = vae_lib.images_from_latents(decoder.params["vae"], decoder.vae_config, x)
        np.testing.assert_allclose(np.asarray(got_img), want_img, atol=1e-4, rtol=1e-4)


def test_identity_is_stable_across_save_load_and_tracks_every_weight(reference, tmp_path):
    _, root, _, decoder = reference
    again = load_decoder(root)
    assert again is not decoder and again.identity == decoder.identity
    saved = load_decoder(save_decoder(decoder, tmp_path / "copy"))
    assert saved.identity == decoder.identity

    params = jax.tree_util.tree_map(lambda a: a, decoder.params)  # new containers, same leaves
    bias = params["unet"]["conv_out"]["bias"]
    params["unet"]["conv_out"]["bias"] = bias.at[0].add(1e-6)
    changed = dataclasses.replace(decoder, params=params)
    assert changed.identity != decoder.identity
    assert decoder.identity == again.identity  # the original is untouched


def test_save_over_a_sharded_folder_is_read_back(reference, tmp_path):
    """A stale shard index in the target folder must not shadow the weights we write."""
    _, _, _, decoder = reference
    target = tmp_path / "target"
    (target / "unet").mkdir(parents=True)
    (target / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"conv_in.weight": "diffusion_pytorch_model-00001-of-00002"
                                                      ".safetensors"}})
    )
    assert load_decoder(save_decoder(decoder, target)).identity == decoder.identity


# ------------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the file or key


def test_missing_folder(tmp_path):
    with pytest.raises(DecoderFolderError, match="does not exist: .*nowhere"):
        load_decoder(tmp_path / "nowhere")


def test_missing_subfolder(broken):
    shutil.rmtree(broken / "unet")
    with pytest.raises(DecoderFolderError, match="'unet/' is missing"):
        load_decoder(broken)


def test_latent_unet_without_vae(broken):
    shutil.rmtree(broken / "vae")
    with pytest.raises(DecoderFolderError, match="in_channels=4 needs a latent VAE.*'vae/'"):
        load_decoder(broken)


def test_pickle_only_weights_are_refused_with_the_conversion(broken):
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    # Not a real pickle: if the loader ever unpickled it, the error would be a different one.
    (broken / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(DecoderFolderError) as e:
        load_decoder(broken)
    message = str(e.value)
    assert "diffusion_pytorch_model.bin" in message and str(broken / "unet") in message
    assert "safetensors only" in message
    assert "save_pretrained" in message and "safe_serialization=True" in message


def test_component_without_weights(broken):
    (broken / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(DecoderFolderError, match=r"no \*\.safetensors weights in .*text_encoder"):
        load_decoder(broken)


def test_shape_mismatch_names_the_key(broken):
    path = broken / "unet" / "config.json"
    config = json.loads(path.read_text())
    config["cross_attention_dim"] = 16  # the checkpoint's attn2 projections read 32
    path.write_text(json.dumps(config))
    with pytest.raises(convert.CheckpointMismatchError) as e:
        load_decoder(broken)
    message = str(e.value)
    assert str(broken / "unet") in message
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in message
    assert "(16, 32)" in message  # checkpoint (out, in) = (16, 32): flax kernel (32, 16) != (16, 16)


def test_unknown_block_type_names_the_key(broken):
    path = broken / "unet" / "config.json"
    config = json.loads(path.read_text())
    config["down_block_types"][0] = "SimpleCrossAttnDownBlock2D"
    path.write_text(json.dumps(config))
    with pytest.raises(DecoderFolderError) as e:
        load_decoder(broken)
    message = str(e.value)
    assert "unet/config.json" in message
    assert "down_block_types[0]" in message and "SimpleCrossAttnDownBlock2D" in message


def test_invalid_json_names_the_file(broken):
    (broken / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000,')
    with pytest.raises(DecoderFolderError, match="scheduler_config.json is not valid JSON"):
        load_decoder(broken)


def test_config_that_is_not_an_object(broken):
    (broken / "text_encoder" / "config.json").write_text("[1, 2]")
    with pytest.raises(DecoderFolderError, match="text_encoder/config.json must hold a JSON object"):
        load_decoder(broken)


def test_corrupt_safetensors_names_the_file(broken):
    path = broken / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:200])  # a truncated download
    with pytest.raises(DecoderFolderError, match="cannot read .*vae/diffusion_pytorch_model"):
        load_decoder(broken)


def test_missing_tokenizer_file(broken):
    (broken / "tokenizer" / "tokenizer.json").unlink()  # transformers 5 writes only this one
    with pytest.raises(DecoderFolderError, match="missing file: .*tokenizer/vocab.json"):
        load_decoder(broken)


def test_tokenizer_from_bpe_files(broken):
    """A transformers 4.x style tokenizer/ (vocab.json + merges.txt, no tokenizer.json) loads too."""
    shutil.rmtree(broken / "tokenizer")
    (broken / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_DIR / name, broken / "tokenizer" / name)
    decoder = load_decoder(broken, load_vae=False)
    assert "vae" not in decoder.params
    assert decoder.context_length == 16  # from text_encoder max_position_embeddings
    reference = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    ids = decoder.tokenizer(PROMPTS)["input_ids"]
    assert ids == reference(PROMPTS)["input_ids"]
    assert clip_text.eos_positions_from_ids(np.asarray([ids[0]]), 605)[0] == len(ids[0]) - 1


def test_latent_decoder_loaded_without_vae_cannot_be_saved(broken, tmp_path):
    decoder = load_decoder(broken, load_vae=False)
    with pytest.raises(DecoderFolderError, match="load_vae=False"):
        folder.save_decoder(decoder, tmp_path / "out")
