"""dediffusion_jax.weights: the one safetensors reader/writer, shown on small arrays.

A real Stable Diffusion / transformers release ships either one `model.safetensors` or shards plus a
`model.safetensors.index.json` ({"weight_map": {key: shard file}}); both read to the same flat dict.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dediffusion_jax import weights

TENSORS = {
    "text_model.embeddings.token_embedding.weight": np.arange(12, dtype=np.float32).reshape(4, 3),
    "text_model.final_layer_norm.weight": np.ones(3, np.float32),
    "text_model.final_layer_norm.bias": np.zeros(3, np.float16),
    "logit_scale": np.asarray(2.5, np.float32),  # 0-d stays 0-d
}


def test_a_sharded_folder_reads_like_its_single_file(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    weights.save(TENSORS, single / "model.safetensors", metadata={"note": "one file"})

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(TENSORS)
    shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for name, part in shards.items():
        weights.save({k: TENSORS[k] for k in part}, sharded / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    from_file = weights.read(single / "model.safetensors")
    from_folder = weights.read(single)
    from_shards = weights.read(sharded)
    for state in (from_file, from_folder, from_shards):
        assert state.keys() == TENSORS.keys()
        for key, value in TENSORS.items():
            assert state[key].dtype == value.dtype and state[key].shape == value.shape, key
            np.testing.assert_array_equal(state[key], value, err_msg=key)
    assert weights.weight_files(sharded) == [sharded / name for name in sorted(shards)]


def test_an_index_naming_a_missing_shard_is_an_error(tmp_path):
    weights.save(TENSORS, tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(weights.MissingWeightsError, match="names missing shards.*00002-of-00002"):
        weights.read(tmp_path)


def test_a_pickle_only_folder_is_refused_with_the_conversion_command(tmp_path):
    # Not a real pickle: were it ever unpickled, the error would be another one.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 never to be unpickled")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(weights.PickleWeightsError) as e:
        weights.read(tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert f"{tmp_path} holds only pickle weights (pytorch_model.bin)" in message
    assert "safetensors only" in message
    assert (f"from_pretrained('{tmp_path}').save_pretrained('{tmp_path}', safe_serialization=True)"
            in message)


def test_a_torch_file_is_refused_by_name_or_by_content(tmp_path):
    pth = tmp_path / "inception.pth"
    pth.write_bytes(b"PK\x03\x04 a torch zip archive")
    with pytest.raises(weights.PickleWeightsError, match=r"inception\.pth.*torch\.load\('.*inception\.pth'"):
        weights.read(pth)
    disguised = tmp_path / "model.safetensors"  # a pickle renamed: the content gives it away
    disguised.write_bytes(pth.read_bytes())
    with pytest.raises(weights.PickleWeightsError, match="convert me"):
        weights.read(disguised, convert="convert me")


def test_a_truncated_file_is_a_one_line_error_naming_the_file(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.save(TENSORS, path)
    path.write_bytes(path.read_bytes()[:100])  # an interrupted download
    with pytest.raises(weights.WeightsError) as e:
        weights.read(tmp_path)
    message = str(e.value)
    assert message.startswith(f"cannot read {path}: ") and "\n" not in message


def test_no_weights_at_all(tmp_path):
    with pytest.raises(weights.MissingWeightsError, match=r"no \*\.safetensors weights in"):
        weights.read(tmp_path)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        weights.read(tmp_path / "absent.safetensors")


def test_a_wrong_shape_names_the_key_and_both_shapes():
    expected = {k: v.shape for k, v in TENSORS.items()}
    weights.check_shapes(TENSORS, expected)  # agreeing shapes pass
    found = {**TENSORS, "text_model.final_layer_norm.weight": np.ones(5, np.float32)}
    with pytest.raises(weights.ShapeMismatchError) as e:
        weights.check_shapes(found, expected, source="world/model.safetensors")
    assert str(e.value) == ("world/model.safetensors does not fit the model: "
                            "text_model.final_layer_norm.weight: expected (3,), found (5,)")
    missing = {k: v for k, v in TENSORS.items() if k != "logit_scale"}
    with pytest.raises(weights.ShapeMismatchError, match=r"logit_scale: missing, expected \(\)"):
        weights.check_shapes(missing, expected)


def test_a_header_length_that_starts_like_a_pickle_still_reads(tmp_path):
    """The pickle sniff looks at the safetensors header too: a length byte 0x80 or "PK" is no pickle."""
    path = tmp_path / "model.safetensors"
    for pad in range(64):
        weights.save(TENSORS, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert weights.read(path).keys() == TENSORS.keys()
