"""The few-shot results as markdown: text source x setting, then per question type. Cells show the
metric x 100: accuracy in %, CIDEr as COCO papers print it (1.035 -> 103.5)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _fmt(cell: Mapping[str, Any] | None, key: str = "all", metric: str = "accuracy") -> str:
    if not cell or key not in cell:
        return ""
    return f"{100 * cell[key][metric]:.1f}"


def _settings(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    seen: list[str] = []
    for per_source in results.values():
        seen += [s for s in per_source if s not in seen]
    return seen


def _heading(setting: str) -> str:
    return f"{setting}-shot" if setting.isdigit() else setting


def accuracy_table(results: Mapping[str, Mapping[str, Any]], metric: str = "accuracy") -> str:
    """Rows: text sources; columns: shots (or classification settings); cells: the metric x 100."""
    settings = _settings(results)
    lines = ["| text source | " + " | ".join(_heading(s) for s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for name, per in results.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(per.get(s), metric=metric) for s in settings) + " |")
    return "\n".join(lines)


def type_table(results: Mapping[str, Mapping[str, Any]], setting: str) -> str:
    """Rows: text sources; columns: question types (and all) at one setting."""
    types = sorted({t for per in results.values() for t in per.get(setting, {}) if t != "all"})
    if not types:
        return ""
    lines = [f"| text source ({_heading(setting)}) | all | " + " | ".join(types) + " |",
             "|---|---|" + "---|" * len(types)]
    for name, per in results.items():
        cell = per.get(setting)
        lines.append(f"| {name} | {_fmt(cell)} | " + " | ".join(_fmt(cell, t) for t in types) + " |")
    return "\n".join(lines)


def markdown(results: Mapping[str, Mapping[str, Any]], title: str, notes: str = "",
             metric: str = "accuracy") -> str:
    """The whole report: the metric's table, then one per-type table per setting that has types."""
    table = accuracy_table(results, metric)
    parts = [f"## {title}", "", notes, "", table] if notes else [f"## {title}", "", table]
    for s in _settings(results):
        table = type_table(results, s)
        if table and any(len(per.get(s, {})) > 2 for per in results.values()):
            parts += ["", table]
    return "\n".join(parts) + "\n"
