"""The transfer tables of projects/miniworld/third_party.py on hand-made protocol results: each source
at its best guidance (by object accuracy) through each decoder, and what transfer cost it."""

from __future__ import annotations

import pytest

from projects.miniworld import third_party


def results(object_by_source: dict[str, dict[str, float]], fid: float) -> dict:
    gs = sorted({g for per in object_by_source.values() for g in per})
    rows = []
    for name, per in object_by_source.items():
        scores = {g: {"object": v, "colour": v, "shape": v, "occupancy": 0.9, "background": 1.0} for g, v in per.items()}
        rows.append({"name": name, "fid": {g: fid for g in per}, "kid": {g: 0.001 for g in per}, "scores": scores})
    return {"guidance_scales": gs, "sources": rows}


def test_best_guidance_per_source_and_the_transfer_loss():
    own = results({"De-Diffusion text": {"1.0": 0.50}, "short caption": {"1.0": 0.20}}, fid=10.0)
    third = results({"De-Diffusion text": {"1.0": 0.30, "3.0": 0.40}, "short caption": {"1.0": 0.15, "3.0": 0.10}},
                    fid=30.0)
    rows = third_party.transfer_rows(own, third)
    assert rows["De-Diffusion text"]["third_party"]["guidance"] == "3.0"
    assert rows["short caption"]["third_party"]["guidance"] == "1.0"
    assert rows["De-Diffusion text"]["transfer_loss"]["object"] == pytest.approx(0.10)
    assert rows["De-Diffusion text"]["transfer_loss"]["world_fid"] == pytest.approx(20.0)
    table = third_party.transfer_table(rows).splitlines()
    assert len(table) == 4 and table[2].startswith("| De-Diffusion text | 0.500 / 10.0 (1.0) | 0.400 /")
    assert "+0.100, +20.0" in table[2] and "/ 1.00 (3.0)" in table[2]  # world-KID x10^3 at the best scale
    sweep = third_party.sweep_table(third, "t").splitlines()
    assert "**0.400 / 30.0**" in sweep[4] and "**0.150 / 30.0**" in sweep[5]


def test_a_source_only_the_third_party_model_drew_has_no_transfer_loss():
    own = results({"short caption": {"1.0": 0.2}}, fid=10.0)
    third = results({"short caption": {"1.0": 0.1}, "new text": {"1.0": 0.3}}, fid=20.0)
    rows = third_party.transfer_rows(own, third)
    assert "transfer_loss" not in rows["new text"]
    assert "| new text | n/a |" in third_party.transfer_table(rows)
