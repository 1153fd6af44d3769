"""projects/miniworld/bench/step_breakdown.py --devices N: the trainer's sharded step on a fake mesh."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sharded_step_runs_on_a_fake_mesh_and_reports_its_time():
    env = {**os.environ, "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}  # the command sets the device count itself
    out = subprocess.run([sys.executable, "projects/miniworld/bench/step_breakdown.py", "--devices", "2",
                          "--iters", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    line = re.search(r"sharded train step: (\d+) cpu device\(s\), global batch (\d+).*median of 1: ([\d.]+) ms",
                     out.stdout)
    assert line, out.stdout[-2000:]
    assert int(line.group(1)) == 2 and int(line.group(2)) == 32 and float(line.group(3)) > 0
