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


def test_an_unreadable_file_is_named_and_skipped_even_as_root(tmp_path, caplog, monkeypatch):
    """chmod 0 does not stop root (the test machine), so the read is made to fail as it does for
    other users: the PermissionError is named and the file skipped, every other file used."""
    valid, bad = bad_images.build(tmp_path / "imgs")
    real_read = Path.read_bytes

    def read_bytes(self):
        if self.name == "unreadable.png":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    valid = [v for v in valid if v != "unreadable.png"]
    config = cli.load_config_file(f"{REPO}/projects/miniworld/configs/world.py")
    config.update_from_flattened_dict({"data.source": f"folder:{tmp_path / 'imgs'}",
                                       "data.shuffle": False, "batch_size": 1})
    it = iter(loop.make_data(config, types.SimpleNamespace(image_size=16)))
    seen: list[str] = []
    with caplog.at_level("WARNING"):
        while len(seen) < len(valid):
            seen += [str(i) for i in next(it)["id"]]
    assert sorted(seen) == valid
    [line] = [r.getMessage() for r in caplog.records if "PermissionError" in r.getMessage()]
    assert line.startswith("skipping corrupt example") and line.endswith("unreadable.png')"), line


def test_decoding_the_corpus_keeps_memory_bounded(tmp_path):
    """Peak memory of a fresh process decoding every corpus file (as training does, min_side 16):
    the 6-Mpx JPEG decodes at reduced scale and the bomb is refused from its header, so the peak
    stays far below one full-size decode (max_pixels x 3 bytes = 268 MB, the per-image bound)."""
    import subprocess
    import sys

    bad_images.build(tmp_path / "imgs")
    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from dediffusion_jax.data.preprocess import decode_image, CorruptExampleError\n"
        "files = sorted(p for p in Path(sys.argv[1]).rglob('*') if p.is_file())\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for p in files:\n"
        "    try:\n"
        "        decode_image(p.read_bytes(), min_side=16)\n"
        "    except CorruptExampleError:\n"
        "        pass\n"
        "print(len(files), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "imgs")], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    files, growth_mb = int(out[0]), float(out[1])
    assert files >= 16
    assert growth_mb < 40, f"decoding the corpus grew the peak RSS by {growth_mb:.0f} MB"
