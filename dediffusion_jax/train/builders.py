"""Training-only builders (the model itself is built by `models.build`).

  quantizer.temperature.{schedule, start, end}   the Gumbel temperature over total_steps
"""

from __future__ import annotations

import ml_collections

from dediffusion_jax.models import quantizer


def build_temperature_fn(config: ml_collections.ConfigDict):
    t = config.quantizer.temperature
    return quantizer.temperature_schedule(
        str(t.schedule), float(t.start), float(t.end), int(config.total_steps)
    )
