"""Reports of the reconstruction protocol: the paper-shaped markdown table and image grids."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

MIN_CELL = 64  # tiny images (16x16 worlds) are upscaled (nearest) to at least this for viewing


KID_SCALE = 1000.0  # KID is shown x10^3, as papers print it (raw values are ~1e-3 for Inception)
KID_LABEL = "KID ×10³"


def format_fid(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}"


def format_kid(value: float | None) -> str:
    """A raw KID as its x10^3 cell ('n/a' when it could not be computed)."""
    return format_fid(None if value is None else value * KID_SCALE)


def _per_guidance_table(results: dict[str, Any], key: str, title: str) -> list[str]:
    """A table of `row[key][guidance]` (KID x10^3 or CLIP score), empty when no row has `key`."""
    rows = [r for r in results["sources"] if key in r]
    if not rows:
        return []
    scales = list(results["guidance_scales"])
    fmt = format_kid if key == "kid" else format_fid
    lines = ["", f"| text source ({title}) | " + " | ".join(scales) + " |",
             "|---|" + "---|" * len(scales)]
    for row in rows:
        lines.append(f"| {row['name']} | " + " | ".join(fmt(row[key].get(g)) for g in scales)
                     + " |")
    return lines


def markdown_table(results: dict[str, Any]) -> str:
    """Rows: text sources; columns: guidance scales; each row's best (lowest) FID in bold.

    Shaped like the paper's table so the two can be read side by side; the header says which
    feature extractor and how many images produced the numbers (they are only comparable with the
    paper's for InceptionV3 on 30K COCO 2014 val images at 256x256). Results with KID (every run
    since KID was added) get a column "KID ×10³ at best" (KID at the FID-best scale) and a second
    table of KID per scale; results with CLIP scores a third table.
    """
    scales = list(results["guidance_scales"])
    p = results["protocol"]
    has_kid = any("kid" in r for r in results["sources"])
    kid_head, kid_rule = (f" {KID_LABEL} at best |", "---|") if has_kid else ("", "")
    lines = [
        f"Reconstruction FID (lower is better): {results['num_images']} images at "
        f"{p['resolution']}x{p['resolution']}, {p['num_steps']} DDIM steps, features "
        f"`{p['extractor']}`; bold = best guidance scale per row.",
        "",
        "| text source (FID, lower is better) | " + " | ".join(scales) + " | best |" + kid_head,
        "|---|" + "---|" * (len(scales) + 1) + kid_rule,
    ]
    for row in results["sources"]:
        cells = []
        for g in scales:
            text = format_fid(row["fid"].get(g))
            cells.append(f"**{text}**" if g == row.get("best_guidance") else text)
        best = (f"{format_fid(row['best_fid'])} @ {row['best_guidance']}"
                if row.get("best_guidance") is not None else "n/a")
        kid = f" {format_kid(row.get('kid_at_best'))} |" if has_kid else ""
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {best} |" + kid)
    lines += _per_guidance_table(results, "kid", f"{KID_LABEL}, lower is better")
    if results.get("kid_note"):
        lines += ["", results["kid_note"]]
    lines += _per_guidance_table(results, "clip_score", "CLIP score, higher is better")
    if results.get("skipped_images"):
        lines += ["", f"{len(results['skipped_images'])} unreadable source image(s) skipped."]
    return "\n".join(lines)


def scores_table(results: dict[str, Any], guidance: str | None = None, *, fid_label: str = "FID ↓",
                 metrics: Sequence[str] | None = None, fid_digits: int = 2,
                 kid_label: str | None = None, clip_label: str | None = None) -> str:
    """One guidance scale of a protocol run with an image scorer: a row per text source with its FID
    (lower is better), its KID x10^3 when `kid_label` names the column (e.g. KID_LABEL + " ↓"), its
    CLIP score when `clip_label` does, and each scored metric (default: all, in the order the scorer
    returned them). KID and CLIP are opt-in so existing tables keep their columns."""
    g = guidance or results["guidance_scales"][0]
    rows = results["sources"]
    metrics = list(metrics or (rows[0].get("scores", {}).get(g, {}) if rows else {}))
    extra = [label for label in (kid_label, clip_label) if label]
    lines = ["| text source | " + " | ".join([fid_label, *extra, *metrics]) + " |",
             "|---|---|" + "---|" * (len(extra) + len(metrics))]
    for row in rows:
        scores = row.get("scores", {}).get(g, {})
        fid = row["fid"].get(g)
        cells = [f"{fid:.{fid_digits}f}" if fid is not None and math.isfinite(fid) else "n/a"]
        if kid_label:
            cells.append(format_kid(row.get("kid", {}).get(g)))
        if clip_label:
            cells.append(format_fid(row.get("clip_score", {}).get(g)))
        cells += [f"{scores[m]:.3f}" if m in scores else "n/a" for m in metrics]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_grid(path: str | os.PathLike, originals: Sequence[np.ndarray],
              columns: Sequence[Sequence[np.ndarray]], labels: Sequence[str]) -> Path:
    """A PNG grid: one row per image, columns original | each text source; labelled header."""
    path = Path(path)
    cols = [list(originals)] + [list(c) for c in columns]
    rows = max((len(c) for c in cols), default=0)
    sample = next((c[0] for c in cols if c), np.zeros((MIN_CELL, MIN_CELL, 3), np.uint8))
    side = max(int(sample.shape[0]), MIN_CELL)
    header, pad = 14, 2
    width = len(cols) * (side + pad) + pad
    canvas = Image.new("RGB", (width, header + rows * (side + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(labels[:len(cols)]):
        # truncated to the cell width (the default bitmap font is ~6 px per character)
        draw.text((pad + j * (side + pad), 1), label[: max(1, side // 6)], fill=(0, 0, 0))
    for j, col in enumerate(cols):
        for i, img in enumerate(col):
            im = Image.fromarray(np.asarray(img, np.uint8))
            if im.size != (side, side):
                im = im.resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(im, (pad + j * (side + pad), header + pad + i * (side + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    canvas.save(tmp)
    os.replace(tmp, path)
    return path
