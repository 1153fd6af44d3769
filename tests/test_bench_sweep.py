"""projects/miniworld/bench/encoder_sweep.py: its config overrides take Python literals of the right type."""

from __future__ import annotations

from pathlib import Path

import pytest

from dediffusion_jax.train.cli import load_config_file
from projects.miniworld.bench import encoder_sweep

REPO = Path(__file__).resolve().parents[1]


def _sweep_module():
    return encoder_sweep


def test_overrides_keep_each_fields_type():
    sweep = _sweep_module()
    config = load_config_file(str(REPO / "projects" / "miniworld" / "configs" / "world.py"))
    with config.unlocked():
        for assignment in ["quantizer.hard=False", "lr.peak=3e-3", "loss.timestep_range=(0.25, 1.0)",
                           "quantizer.temperature.schedule=linear"]:
            sweep.apply_override(config, assignment)
    assert config.quantizer.hard is False and config.lr.peak == pytest.approx(3e-3)
    assert tuple(config.loss.timestep_range) == (0.25, 1.0)
    assert config.quantizer.temperature.schedule == "linear"
