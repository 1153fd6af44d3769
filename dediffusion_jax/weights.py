"""The one place that reads and writes weights: safetensors files, folders and sharded folders.

Why one place: every loader (decoder folders, CLIP vision towers, FID Inception, the miniature world's
networks) must refuse the same things with the same words. Pickle-based weights (.bin, .ckpt, .pt,
.pth) are never opened, because unpickling runs arbitrary code; a truncated or corrupt file is an
error naming the file; a shape that does not fit names the key.

    read(path)                    one .safetensors file, or a folder's weights: a sharded release
                                  (`*.safetensors.index.json`: {"weight_map": {key: shard_file}}, as
                                  SD/SDXL/transformers releases ship) or its single *.safetensors
                                  -> flat {key: np.ndarray}
    check_shapes(found, expected) names every missing, unexpected and misshapen key
    save(tensors, path, metadata) writes a flat dict as one .safetensors file (atomically)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import safetensors.numpy
from dediffusion_jax.errors import UserError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# Preferred single-file names in a folder (diffusers, transformers), before any other *.safetensors.
SINGLE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


class WeightsError(UserError, ValueError):
    """Weights that cannot be read: corrupt, truncated, or an inconsistent shard index."""


class PickleWeightsError(WeightsError):
    """Pickle-only weights, refused (unpickling runs arbitrary code)."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """No weights where they were asked for."""


class ShapeMismatchError(WeightsError):
    """Weights whose keys or shapes differ from what the model expects."""


def torch_to_safetensors_command(path: str | os.PathLike) -> str:
    """A shell command that converts one torch pickle to safetensors (run where you trust the file)."""
    src = Path(path)
    dst = src.with_suffix(".safetensors")
    return ("python -c \"import torch, safetensors.torch as st; "
            f"st.save_file(torch.load('{src}', map_location='cpu', weights_only=True), '{dst}')\"")


def save_pretrained_command(folder: str | os.PathLike, cls: str = "transformers.AutoModel") -> str:
    """A shell command that re-saves a diffusers/transformers folder with safetensors weights."""
    module, name = cls.rsplit(".", 1)
    return (f"python -c \"from {module} import {name} as M; M.from_pretrained('{folder}')"
            f".save_pretrained('{folder}', safe_serialization=True)\"")


def refuse_pickle(where: str | os.PathLike, names: Sequence[str], command: str) -> PickleWeightsError:
    """The one refusal message: what was found, why it is not read, and the command that converts it."""
    return PickleWeightsError(
        f"{where} holds only pickle weights ({', '.join(names)}); this project loads safetensors only, "
        f"since unpickling runs arbitrary code. Convert once, in an environment you trust: {command}")


def _looks_pickled(head: bytes) -> bool:
    # safetensors: an 8-byte little-endian header length, then the JSON header's "{". Otherwise:
    # torch >= 1.6 writes a zip archive ("PK"); older torch and plain pickles start with 0x80.
    return head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80")


def read_file(path: str | os.PathLike, *, convert: str | None = None) -> dict[str, np.ndarray]:
    """One .safetensors file -> {key: array}. `convert` overrides the conversion command shown when
    the file is a torch pickle."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise refuse_pickle(path.parent, [path.name], convert or torch_to_safetensors_command(path))
    if not path.is_file():
        raise MissingWeightsError(f"no weights file {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    if _looks_pickled(head):
        raise refuse_pickle(path.parent, [path.name], convert or torch_to_safetensors_command(path))
    try:
        return safetensors.numpy.load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt or truncated files
        reason = " ".join(str(e).split())
        raise WeightsError(f"cannot read {path}: {reason} (truncated or not a safetensors file?)") from e


def weight_files(folder: str | os.PathLike, *, convert: str | None = None) -> list[Path]:
    """The safetensors files of a folder: the shards its index names, else its one single file
    (`SINGLE_NAMES` first). Pickle-only folders are refused with `convert` (default: save_pretrained)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingWeightsError(f"no weights folder {folder}")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{indexes[0]} is not a shard index ({{\"weight_map\": {{key: file}}}}): "
                               f"{type(e).__name__}: {e}") from e
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MissingWeightsError(f"{indexes[0]} names missing shards: {missing}")
        return files
    singles = [folder / n for n in SINGLE_NAMES if (folder / n).is_file()]
    singles = singles or sorted(folder.glob("*.safetensors"))
    if singles:
        return singles[:1]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise refuse_pickle(folder, pickles, convert or save_pretrained_command(folder))
    raise MissingWeightsError(f"no *.safetensors weights in {folder}")


def read(path: str | os.PathLike, *, convert: str | None = None) -> dict[str, np.ndarray]:
    """A .safetensors file, or a folder's weights (all shards of an index merged) -> {key: array}.

    `convert` is the conversion command shown when only pickle weights are found there.
    """
    path = Path(path)
    if not path.is_dir():
        return read_file(path, convert=convert)
    state: dict[str, np.ndarray] = {}
    for f in weight_files(path, convert=convert):
        state.update(read_file(f, convert=convert))
    return state


def check_shapes(found: Mapping[str, object], expected: Mapping[str, Sequence[int]],
                 source: str | os.PathLike = "weights") -> None:
    """Raises ShapeMismatchError naming each missing, unexpected or misshapen key of `found`
    (arrays or shapes) against `expected` (shapes); returns None when they agree."""
    def shape(x: object) -> tuple[int, ...]:
        return tuple(int(d) for d in (x.shape if hasattr(x, "shape") else x))  # type: ignore[union-attr]

    problems = [f"{k}: expected {tuple(expected[k])}, found {shape(found[k])}"
                for k in sorted(expected.keys() & found.keys()) if shape(found[k]) != tuple(expected[k])]
    problems += [f"{k}: missing, expected {tuple(expected[k])}" for k in sorted(expected.keys() - found.keys())]
    problems += [f"{k}: unexpected, found {shape(found[k])}" for k in sorted(found.keys() - expected.keys())]
    if problems:
        raise ShapeMismatchError(f"{source} does not fit the model: " + "; ".join(problems))


def save(tensors: Mapping[str, object], path: str | os.PathLike,
         metadata: Mapping[str, str] | None = None) -> Path:
    """Writes `tensors` (dtypes kept; 0-d stays 0-d) as one .safetensors file, atomically.

    The header's metadata gets {"format": "pt"} unless given otherwise, so transformers and diffusers
    load the file as written.
    """
    path = Path(path)
    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    safetensors.numpy.save_file(arrays, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)
    return path
