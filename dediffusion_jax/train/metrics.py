"""Run metrics: metrics.jsonl + TensorBoard (tensorboardX), progress lines, sample texts.

Why tensorboardX and not clu.metric_writers: clu's writers import TensorFlow, which this project does
not install (requirements.txt); tensorboardX writes the same event files with no TF. Only process 0
writes; every process computes the same (replicated) metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class MetricWriter:
    """Appends one JSON object per step to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 resume_from: int | None = None):
        """`resume_from`: the step the run (re)starts from (-1: a fresh start). Rows past it, which
        an interrupted invocation wrote after its last checkpoint, are dropped from metrics.jsonl and
        samples.jsonl, and TensorBoard is told to discard its events past it (purge_step), so each
        step appears once."""
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._samples = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            from dediffusion_jax.train.workdir import truncate_jsonl

            dropped = sum(truncate_jsonl(self.workdir / name, resume_from)
                          for name in ("metrics.jsonl", "samples.jsonl"))
            if dropped:
                log.info("dropped %d metric/sample rows past step %d (written after the last "
                         "checkpoint of an interrupted run)", dropped, resume_from)
        self._jsonl = (self.workdir / "metrics.jsonl").open("a")
        self._samples = (self.workdir / "samples.jsonl").open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"),
                                     purge_step=None if resume_from is None else resume_from + 1)

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for k, v in scalars.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else str(v)
            if self._tb is not None:
                self._tb.add_scalar(k, v, int(step))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def write_samples(self, step: int, ids: list[str], texts: list[str]) -> None:
        if not self.enabled:
            return
        for i, t in zip(ids, texts):
            self._samples.write(json.dumps({"step": int(step), "id": i, "text": t}) + "\n")
        self._samples.flush()
        if self._tb is not None:
            self._tb.add_text("samples", "\n\n".join(f"`{i}`: {t}" for i, t in zip(ids, texts)),
                              int(step))

    def write_images(self, step: int, images: dict[str, Any]) -> None:
        """TensorBoard images, one tag per key: [H, W, 3] uint8, or float in [0, 1]."""
        if not self.enabled or self._tb is None:
            return
        for key, image in images.items():
            image = np.asarray(image)
            if image.dtype != np.uint8:
                image = np.clip(image.astype(np.float32), 0.0, 1.0)
            self._tb.add_image(key, image, int(step), dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        for f in (self._jsonl, self._samples):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()


class StepTimer:
    """Wall time between consecutive completed steps, throughput and TFLOP/s."""

    def __init__(self, global_batch: int, num_devices: int, flops_per_device_step: float | None):
        self.global_batch = global_batch
        self.num_devices = num_devices
        self.flops = flops_per_device_step
        self._last = time.perf_counter()

    def lap(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._last, 1e-9)
        self._last = now
        out = {
            "step_time_s": dt,
            "images_per_s": self.global_batch / dt,
            "images_per_s_per_device": self.global_batch / dt / self.num_devices,
        }
        if self.flops:
            # XLA's cost analysis of the partitioned step is per device.
            out["tflops_per_s_per_device"] = self.flops / dt / 1e12
            out["tflops_per_s"] = self.flops * self.num_devices / dt / 1e12
        return out


class Progress:
    """A console line every `every` steps: step, loss (+ temperature, lr, distinct tokens when the
    step reports them), steps/s (over the window), images/s, step time and ETA."""

    def __init__(self, total_steps: int, every: int, start_step: int):
        self.total, self.every = total_steps, max(int(every), 1)
        self._t, self._s = time.perf_counter(), start_step

    def maybe_log(self, step: int, scalars: dict[str, float]) -> str | None:
        if step % self.every and step != self.total:
            return None
        now = time.perf_counter()
        rate = (step - self._s) / max(now - self._t, 1e-9)
        self._t, self._s = now, step
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        parts = [f"step {step}/{self.total}"]
        if "loss" in scalars:
            parts.append(f"loss {scalars['loss']:.4f}")
        if "temperature" in scalars:
            parts.append(f"T {scalars['temperature']:.3f}")
        if "learning_rate" in scalars:
            parts.append(f"lr {scalars['learning_rate']:.2e}")
        if "distinct_tokens" in scalars:
            parts.append(f"tokens {int(scalars['distinct_tokens'])}")
        parts.append(f"{rate:.2f} steps/s {scalars.get('images_per_s', 0):.0f} img/s")
        if "step_time_s" in scalars:
            parts.append(f"step {scalars['step_time_s'] * 1e3:.0f} ms")
        line = " ".join(parts) + f" ETA {format_seconds(eta)}"
        log.info(line)
        return line


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
