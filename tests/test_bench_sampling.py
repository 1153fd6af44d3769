"""bench/sampling: the `--tiny` preset times our sampler and diffusers' StableDiffusionPipeline built from
the same weights, writes every field, and the two draw the same images from the same noise (float32)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parity
def test_tiny_sampling_with_torch_writes_json_markdown_and_matches_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    from bench.sampling.run import main

    result = main(["--tiny", "--batch", "2", "--ddim-steps", "10", "--devices", "1", "--compare", "torch",
                   "--torch-threads", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "sampling.json").read_text()) == json.loads(json.dumps(result))
    assert result["decoder"] == "tiny" and result["dtype"] == "float32"  # auto on CPU
    assert result["ddim_steps"] == 10 and result["guidance_scale"] == 7.5 and result["image_size"] == 16
    assert result["environment"]["platform"] == "cpu" and result["environment"]["device_count"] == 1
    assert set(result["params"]) == {"text_encoder", "unet", "vae"}
    (run,) = result["runs"]
    assert run["batch_per_device"] == run["global_batch"] == 2 and run["timed_batches"] == 3
    assert run["compile_s"] > 0 and run["batch_ms_min"] <= run["batch_ms"] <= run["batch_ms_max"]
    assert run["images_per_s"] == pytest.approx(2e3 / run["batch_ms"])
    assert run["images_per_s_per_device"] == run["images_per_s"] and run["peak_bytes_in_use"] is None
    (torch_row,) = result["torch"]
    assert torch_row["device"] == "cpu" and torch_row["dtype"] == "float32" and torch_row["batch"] == 2
    assert torch_row["attention"] == "sdpa" and torch_row["timed_batches"] == 3
    assert torch_row["ours_over_torch_images_per_s"] == pytest.approx(
        run["images_per_s"] / torch_row["images_per_s"])
    # Same weights, ids and noise, eta 0: the same images up to float32 rounding (measured 2e-6 at 50
    # steps, guidance 7.5), with most pixels inside (0, 1) so clamping does not hide a difference.
    parity = torch_row["parity"]
    assert parity["images"] == 2 and parity["unclamped_fraction"] > 0.5, parity
    assert parity["max_abs_diff"] < 1e-4 and parity["uint8_max_diff"] <= 1, parity
    table = (tmp_path / "sampling.md").read_text()
    assert "| 2 | 2 |" in table and "| 2 | cpu | float32 |" in table and "ms/batch" in table


def test_help_answers_without_jax():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "bench.sampling", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--ddim-steps" in proc.stdout, proc.stderr[-2000:]
    assert not re.search(r"\|\s+(jax|torch)$", proc.stderr, flags=re.M)


def test_too_few_repeats_and_guidance_below_one_are_refused():
    from bench.sampling.run import parse_args

    with pytest.raises(SystemExit, match="at least 3"):
        parse_args(["--tiny", "--repeats", "2"])
    with pytest.raises(SystemExit, match="guidance"):
        parse_args(["--tiny", "--guidance", "0.5"])


@pytest.mark.slow  # the default run stayed over 20 min on a slower 2-core machine (2026-12-07): .ci/run's slow phase runs it
def test_data_parallel_over_two_devices_reports_per_device_rate(tmp_path):
    from bench.sampling.run import main

    result = main(["--tiny", "--batch", "1", "--ddim-steps", "2", "--devices", "2", "--out", str(tmp_path)])
    (run,) = result["runs"]
    assert result["environment"]["device_count"] == 2 and "torch" not in result
    assert run["batch_per_device"] == 1 and run["global_batch"] == 2
    assert run["images_per_s_per_device"] == pytest.approx(run["images_per_s"] / 2)


def test_a_spent_budget_skips_what_is_left_and_still_writes_the_table(tmp_path):
    from bench.sampling.run import main

    result = main(["--tiny", "--batch", "1,2", "--devices", "1", "--compare", "torch", "--max-seconds", "1e-9",
                   "--out", str(tmp_path)])
    assert [r.get("skipped") for r in result["runs"] + result["torch"]] == ["time budget spent"] * 4
    assert "time budget spent" in (tmp_path / "sampling.md").read_text()
