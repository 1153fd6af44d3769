"""Explicit, checked mapping between PyTorch state-dict keys and Flax param trees.

Why: diffusers/transformers checkpoints name tensors `a.b.0.c.weight` in PyTorch layout; our Flax
modules mirror those names with list indices folded into the parent name (`a/b_0/c/kernel`). The
mapping is one rule plus an explicit table of exceptions, and every tensor is checked against the
module's abstract shapes, so a wrong config or a foreign checkpoint fails loudly with the key named.

Rules (torch -> flax):
- key segments split on '.'; a purely numeric segment is folded into the previous one: `blocks.0` ->
  `blocks_0`;
- the leaf `weight` becomes `kernel` (Linear: transposed (out, in) -> (in, out); Conv2d: (O, I, H, W)
  -> (H, W, I, O)), or `scale` (norms), or `embedding` (nn.Embedding), whichever the Flax module has;
- `bias` stays `bias`; any other leaf (e.g. CLIP's `class_embedding`) is copied as is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util
from dediffusion_jax.errors import UserError

# Torch module names that genuinely end in `_<digit>` and therefore must not be split into a list
# index when mapping Flax names back to torch keys.
LITERAL_UNDERSCORE_NAMES = frozenset({"linear_1", "linear_2"})


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint does not fit the module built from its config."""


def _torch_module_path(key: str) -> tuple[tuple[str, ...], str]:
    parts = key.split(".")
    *module, leaf = parts
    folded: list[str] = []
    for seg in module:
        if seg.isdigit() and folded:
            folded[-1] = f"{folded[-1]}_{seg}"
        else:
            folded.append(seg)
    return tuple(folded), leaf


def _flax_to_torch_module(path: Iterable[str]) -> list[str]:
    out: list[str] = []
    for seg in path:
        m = re.fullmatch(r"(.+)_(\d+)", seg)
        if m and seg not in LITERAL_UNDERSCORE_NAMES:
            out.extend([m.group(1), m.group(2)])
        else:
            out.append(seg)
    return out


def _torch_tensor_to_flax(leaf_name: str, value: np.ndarray) -> np.ndarray:
    if leaf_name == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:
            return np.transpose(value, (1, 0))
    return value


def _flax_tensor_to_torch(leaf_name: str, value: np.ndarray) -> np.ndarray:
    if leaf_name == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (3, 2, 0, 1))
        if value.ndim == 2:
            return np.transpose(value, (1, 0))
    return value


def torch_to_flax(
    state: Mapping[str, np.ndarray],
    abstract_params: Any,
    *,
    source: str = "checkpoint",
    ignore: Iterable[str] = (),
    aliases: Mapping[str, str] | None = None,
) -> dict:
    """Maps a torch-layout state dict onto the Flax tree whose shapes are `abstract_params`.

    Args:
      state: key -> array in PyTorch layout (e.g. from `dediffusion_jax.weights.read`).
      abstract_params: the module's params (arrays or `jax.ShapeDtypeStruct`s), used for names,
        shapes and dtypes. Nothing is taken from their values.
      source: file name used in error messages.
      ignore: regexes of torch keys that are expected and dropped (non-persistent buffers, heads the
        Flax module does not have).
      aliases: regex -> replacement applied to torch keys first (older checkpoint naming schemes).

    Returns:
      A nested dict of numpy arrays with the structure of `abstract_params`.

    Raises:
      CheckpointMismatchError: naming every missing, unexpected or wrongly shaped tensor.
    """
    flat_target = traverse_util.flatten_dict(_unfreeze(abstract_params))
    ignore_res = [re.compile(p) for p in ignore]
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    problems: list[str] = []
    for key, value in state.items():
        name = key
        for pattern, repl in (aliases or {}).items():
            name = re.sub(pattern, repl, name)
        module, leaf = _torch_module_path(name)
        candidates = (
            ("kernel", "scale", "embedding") if leaf == "weight" else (leaf,)
        )
        target_path = next(
            (module + (c,) for c in candidates if module + (c,) in flat_target), None
        )
        if target_path is None:
            if not any(r.search(key) for r in ignore_res):
                unexpected.append(key)
            continue
        array = _torch_tensor_to_flax(target_path[-1], np.asarray(value))
        expected = flat_target[target_path]
        if tuple(array.shape) != tuple(expected.shape):
            problems.append(
                f"  {key}: checkpoint shape {tuple(np.shape(value))} -> {tuple(array.shape)}, "
                f"model expects {tuple(expected.shape)} at {'/'.join(target_path)}"
            )
            continue
        out[target_path] = array.astype(expected.dtype, copy=False)
    missing = ["/".join(p) for p in flat_target if p not in out]
    if problems or missing or unexpected:
        lines = [f"{source} does not match the model built from its config:"]
        if problems:
            lines += ["shape mismatches:", *problems]
        if missing:
            lines += ["missing from the checkpoint (Flax names):"]
            lines += [f"  {m}" for m in missing[:20]]
            if len(missing) > 20:
                lines.append(f"  ... and {len(missing) - 20} more")
        if unexpected:
            lines += ["unexpected keys in the checkpoint:"]
            lines += [f"  {u}" for u in unexpected[:20]]
            if len(unexpected) > 20:
                lines.append(f"  ... and {len(unexpected) - 20} more")
        raise CheckpointMismatchError("\n".join(lines))
    return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Any) -> dict[str, np.ndarray]:
    """Inverse of `torch_to_flax`: a Flax param tree -> torch-layout state dict of numpy arrays."""
    out: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(_unfreeze(params)).items():
        *module, leaf = path
        torch_leaf = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
        key = ".".join(_flax_to_torch_module(module) + [torch_leaf])
        out[key] = np.ascontiguousarray(_flax_tensor_to_torch(leaf, np.asarray(value)))
    return out


def _unfreeze(tree: Any) -> dict:
    if hasattr(tree, "unfreeze"):
        return tree.unfreeze()
    return dict(tree)
