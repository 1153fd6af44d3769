"""Evaluators named in the config and run by the trainer (big_vision's `config.evals`).

    config.evals = {
        "world": {"type": "miniworld.reconstruction", "every_steps": 250, "num_scenes": 64},
    }

Each entry is built by the factory registered for its `type` (a project registers its own types on
import, see dediffusion_jax/extensions.py) and is run by the trainer every `every_steps` steps and at
the end of training (`every_steps: 0` = only at the end). An evaluator returns named scalars and
images; the trainer writes them to metrics.jsonl ("eval/NAME/KEY") and TensorBoard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from dediffusion_jax.errors import UserError


@dataclasses.dataclass
class EvalResult:
    """scalars: {key: float}; images: {key: [H, W, 3] uint8 or float in [0, 1]}."""

    scalars: dict[str, float] = dataclasses.field(default_factory=dict)
    images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class Evaluator(Protocol):
    name: str
    every_steps: int

    def run(self, view: Any) -> EvalResult:
        """`view`: what the trainer offers of the current model (for De-Diffusion an inference object
        with `.token_ids(images)` and `.texts(images)`)."""
        ...


EvaluatorFactory = Callable[..., Evaluator]
_REGISTRY: dict[str, EvaluatorFactory] = {}


class EvaluatorConfigError(UserError, ValueError):
    """config.evals names an unknown type or gives it arguments it does not take."""


def register_evaluator(type_name: str, factory: EvaluatorFactory) -> None:
    """`factory(name=..., every_steps=..., run_config=..., **fields of the config entry)` -> Evaluator."""
    _REGISTRY[type_name] = factory


def registered_types() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def build_evaluators(config: Any) -> list[Evaluator]:
    """The evaluators of `config.evals` (empty when the config has none), in name order."""
    evals = config.get("evals", None) if hasattr(config, "get") else None
    if not evals:
        return []
    out = []
    for name in sorted(evals):
        entry = dict(evals[name])
        type_name = str(entry.pop("type", ""))
        if type_name not in _REGISTRY:
            raise EvaluatorConfigError(
                f"config.evals.{name}.type={type_name!r} is not a registered evaluator type; known: "
                f"{', '.join(registered_types()) or 'none (list the module that registers it in config.imports)'}")
        every = int(entry.pop("every_steps", 0))
        try:
            out.append(_REGISTRY[type_name](name=name, every_steps=every, run_config=config, **entry))
        except TypeError as e:
            raise EvaluatorConfigError(f"config.evals.{name} ({type_name}): {e}") from e
    return out


def due(evaluator: Evaluator, step: int, total_steps: int) -> bool:
    """Every `every_steps` steps, and always at the last step."""
    every = int(evaluator.every_steps)
    return step == total_steps or (every > 0 and step % every == 0)


def flatten(name: str, result: EvalResult) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """{"eval/NAME/KEY": value} for scalars and images."""
    prefix = f"eval/{name}/"
    return ({prefix + k: float(v) for k, v in result.scalars.items()},
            {prefix + k: np.asarray(v) for k, v in result.images.items()})


def run_due(evaluators: list[Evaluator], step: int, total_steps: int, view: Any,
            log: Callable[[str], None] | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Runs the evaluators due at `step`; returns their flattened scalars and images."""
    scalars: dict[str, float] = {}
    images: dict[str, np.ndarray] = {}
    for ev in evaluators:
        if not due(ev, step, total_steps):
            continue
        s, i = flatten(ev.name, ev.run(view))
        scalars.update(s)
        images.update(i)
        if log is not None:
            log(f"eval {ev.name} at step {step}: " + ", ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in s.items()))
    return scalars, images
