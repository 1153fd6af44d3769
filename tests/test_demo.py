"""`make demo` in miniature: a few training steps, a few held-out scenes, every output written."""

from __future__ import annotations

import json

from PIL import Image

from projects.miniworld import demo
from projects.miniworld import probe, scenes

SOURCES = ["De-Diffusion text", "full caption (upper ref.)", "short caption", "short caption + background",
           "empty text (lower ref.)"]


def test_reduced_demo_writes_the_table_text_statistics_examples_and_grid(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert demo.main(["--workdir", str(workdir), "--steps", "3", "--eval-scenes", "8",
                      "--ddim-steps", "2"]) == 0
    out = capsys.readouterr().out
    for needle in ("[1/4] training", "[2/4] encoding 8 held-out scenes", "[3/4] redrawing",
                   "[4/4] the paper's protocol: redrawing the same texts with the third-party model sd_world",
                   "Distinct De-Diffusion texts:", "demo finished in"):
        assert needle in out, needle

    results = json.loads((workdir / "results.json").read_text())
    assert list(results["rows"]) == SOURCES
    for row in results["rows"].values():
        assert 0.0 <= row["colour"] <= 1.0 and row["world_fid"] >= 0.0
    assert set(results["text_statistics"]) == {"De-Diffusion text", "short caption"}
    assert len(results["texts"]) == 8 and 1 <= results["distinct_texts"] <= 8
    full = results["rows"]["full caption (upper ref.)"]
    assert full["background"] >= 0.75  # the committed decoder follows the full caption's background
    # Step 4, the paper's protocol: every source through the third-party model, at its best guidance.
    third = results["third_party"]
    assert list(third) == SOURCES
    for row in third.values():
        assert row["third_party"]["guidance"] in ("1.0", "3.0") and 0.0 <= row["third_party"]["object"] <= 1.0
        assert set(row["transfer_loss"]) >= {"object", "world_fid"}
    assert third["full caption (upper ref.)"]["third_party"]["background"] >= 0.75

    report = (workdir / "results.md").read_text()
    assert report.count("\n| ") >= len(SOURCES) + 2 and "Examples (ground truth" in report
    # The protocol's grid: a row per scene (8), columns original + each text source.
    grid = Image.open(workdir / "world_eval" / "grid.png")
    assert grid.height >= 8 * scenes.IMAGE_SIZE and grid.width >= (1 + len(SOURCES)) * scenes.IMAGE_SIZE
    assert (workdir / "checkpoints" / "3").is_dir()

    # The probe reads the same run: its texts become a row of teacher-forced losses.
    assert probe.main(["--workdir", str(workdir), "--scenes", "4", "--draws", "1"]) == 0
    out = capsys.readouterr().out
    assert "| De-Diffusion text | " in out and "distinct of 4; attribute-word recall: colours" in out

    # And the probe's slot mass: the encoder's word distribution split by kind of word.
    mass = probe.slot_word_mass(workdir, scenes.evaluation_indices(4))
    assert set(mass) == {"background", "colour", "shape", "absent shape", "shape, best slot"}
    assert all(0.0 <= v <= 1.0 for v in mass.values())
    assert mass["shape"] + mass["absent shape"] <= 1.0 + 1e-6  # the three shapes share one softmax
    assert mass["shape, best slot"] >= mass["shape"]
    assert probe.main(["--workdir", str(workdir), "--scenes", "4", "--slot-mass"]) == 0
    assert "mean probability mass per slot" in capsys.readouterr().out
