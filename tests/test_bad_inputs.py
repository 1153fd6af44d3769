"""The bad-input corpus (tests/helpers/bad_images.py) through training (a folder source) and encode:
every broken file is named and skipped, every valid one is used (issue 17)."""

from __future__ import annotations

import json
import types
from pathlib import Path

from dediffusion_jax import encode
from dediffusion_jax.train import cli, loop
from helpers import bad_images

REPO = Path(__file__).resolve().parents[1]


def test_training_on_a_folder_of_bad_inputs_uses_every_valid_file_and_names_every_bad_one(tmp_path, caplog):
    valid, bad = bad_images.build(tmp_path / "imgs")
    n = len(valid) + len(bad)
    config = cli.load_config_file(f"{REPO}/projects/miniworld/configs/world.py")
    config.update_from_flattened_dict({"data.source": f"folder:{tmp_path / 'imgs'}",
                                       "data.shuffle": False, "batch_size": 1})
    it = iter(loop.make_data(config, types.SimpleNamespace(image_size=16)))
    seen: list[str] = []
    with caplog.at_level("WARNING"):
        while len(seen) < len(valid):  # one pass over the folder (the last file, wide.png, is valid)
            batch = next(it)
            assert batch["backbone"].shape == (1, 16, 16, 3)
            seen += [str(i) for i in batch["id"]]
    assert sorted(seen) == valid
    assert it.num_skipped == len(bad) and n == len(valid) + it.num_skipped
    for name in bad:
        assert f"skipping corrupt example {name}" in caplog.text, name
    assert "decompression-bomb protection" in caplog.text


def test_encode_on_a_folder_of_bad_inputs_writes_every_valid_file_and_names_every_bad_one(tmp_path, capsys):
    from test_encode import tiny_encoder

    valid, bad = bad_images.build(tmp_path / "imgs")
    out = tmp_path / "texts.jsonl"
    summary = encode.encode_to_jsonl([str(tmp_path / "imgs")], out, tiny_encoder(), progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == valid
    assert sorted(name for name, _ in summary["errors"]) == bad
    err = capsys.readouterr().err
    assert all(err.count(f"skipped unreadable image {name}:") == 1 for name in bad), err
