"""How projects plug into the core without the core importing them.

A config lists modules in `config.imports` (e.g. ``("projects.miniworld.extensions",)``); each one
registers what it adds when imported: data-source prefixes (`data.sources.register_source`) and
evaluators (`evaluation.evaluators.register_evaluator`). The trainer, `encode` and `evaluate` call
`import_extensions(config)` before they read data or build evaluators. The core names no project.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any
from dediffusion_jax.errors import UserError


class ExtensionError(UserError, ImportError):
    """A module listed in config.imports cannot be imported."""


def import_extensions(config_or_modules: Any) -> tuple[str, ...]:
    """Imports every module of `config.imports` (or of an iterable of module names); returns them."""
    modules: Iterable[str]
    if hasattr(config_or_modules, "get"):
        modules = tuple(config_or_modules.get("imports", ()) or ())
    else:
        modules = tuple(config_or_modules)
    for name in modules:
        try:
            importlib.import_module(str(name))
        except ImportError as e:
            raise ExtensionError(f"config.imports names {name!r}, which cannot be imported: {e}. "
                                 "Is the project installed (pip install -e .) or on PYTHONPATH?") from e
    return tuple(str(m) for m in modules)
