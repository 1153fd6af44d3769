"""`python -m bench.unet_cpu`: our UNet and diffusers' on the same weights, timed side by side."""

import json

from bench import unet_cpu


def test_the_tiny_preset_times_both_sides_and_their_outputs_agree(tmp_path):
    assert unet_cpu.main(["--preset", "tiny", "--repeats", "1", "--torch-threads", "1", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "unet_cpu.json").read_text())["rows"]
    assert row["preset"] == "tiny" and row["batch"] == 2
    assert row["devices"] == 2  # ours split over the most of the process's 8 CPU devices that divide the batch
    assert row["max_abs_diff"] < 1e-4  # the same model on both sides
    for key in ("ours_forward_ms", "torch_forward_ms", "ours_text_grad_ms", "torch_text_grad_ms"):
        assert row[key] > 0
    assert "| tiny | 2 | 2 |" in (tmp_path / "unet_cpu.md").read_text()


def test_an_unknown_preset_is_one_error_line(capsys):
    assert unet_cpu.main(["--preset", "sd3"]) == 2
    assert "error: --preset 'sd3'" in capsys.readouterr().err
