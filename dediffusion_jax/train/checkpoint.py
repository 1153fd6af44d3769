"""Checkpoints of a training run (orbax): train state, data iterator, and the task's JSON items.

The trainer spine (train/trainer.py) saves WORKDIR/checkpoints/STEP/{state, data, *JSON items}; the
JSON items come from the task (`save_items`). De-Diffusion's layout is
WORKDIR/checkpoints/STEP/{state, data, config, decoder}:
- state:   the TrainState (trainable encoder params + optimizer state + step), sharded arrays;
- data:    the grain iterator state, one JSON file per process (each process reads its own shard);
- config:  the run's config as JSON (what `inference.TextEncoder` rebuilds the model from);
- decoder: {"path", "identity"}: a resumed run refuses a decoder whose weights hash differs.

Rules (maxdiffusion's bare `except:` that starts afresh on any error is exactly what this avoids):
- a workdir with a checkpoint resumes from its latest step by itself;
- a checkpoint that cannot be restored raises `CheckpointError`; it never becomes a fresh start;
- saves are asynchronous (orbax copies arrays to host, then writes in the background); `close()`
  waits for them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from dediffusion_jax.errors import UserError

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config", "decoder")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint exists but cannot be used (corrupt, incompatible, or a different decoder)."""


class DecoderMismatchError(CheckpointError):
    """The checkpoint was trained against another decoder (weights hash differs)."""


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).expanduser().resolve() / "checkpoints"


def make_manager(workdir: str | Path, keep: int = 3, async_save: bool = True,
                 item_names: tuple[str, ...] = ITEMS) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        item_names=tuple(item_names),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=int(keep), create=True, enable_async_checkpointing=bool(async_save)),
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         config: ml_collections.ConfigDict, decoder_info: dict[str, str]) -> None:
    """Starts an (async) save of a De-Diffusion run: state, data, config, decoder identity."""
    save_items(manager, step, state, data_iterator, de_diffusion_items(config, decoder_info))


def de_diffusion_items(config: ml_collections.ConfigDict, decoder_info: dict[str, str]) -> dict[str, dict]:
    """The JSON items of a De-Diffusion checkpoint: the run's config and its decoder's identity."""
    return {"config": json.loads(config.to_json()), "decoder": dict(decoder_info)}


def save_items(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
               json_items: dict[str, dict]) -> None:
    """Starts an (async) save of everything a resume needs: the state, the data iterator's position
    (one file per process) and `json_items` ({item name: JSON-able dict}). Call
    `manager.wait_until_finished()` before reading it or exiting."""
    import grain

    args = dict(state=ocp.args.StandardSave(state))
    for name, value in json_items.items():
        args[name] = ocp.args.JsonSave(value)
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(int(step), args=ocp.args.Composite(**args), force=True)
    log.info("checkpoint: saving step %d to %s", step, manager.directory)


def decoder_info(decoder: Any) -> dict[str, str]:
    """{"path", "identity"} of a `t2i.folder.LoadedDecoder` (identity = its weights hash). The path
    is absolute, so the checkpoint's encoder loads from any working directory."""
    path = str(Path(decoder.path).expanduser().resolve()) if decoder.path else ""
    return {"path": path, "identity": decoder.identity}


def read_json(manager: ocp.CheckpointManager, step: int, item: str) -> dict:
    """A JSON item of checkpoint `step`; CheckpointError naming the item when it cannot be read."""
    return _restore_json(manager, step, item)


def _restore_json(manager: ocp.CheckpointManager, step: int, item: str) -> dict:
    try:
        out = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return dict(out[item])
    except Exception as e:  # noqa: BLE001 - re-raised with the checkpoint named
        raise CheckpointError(
            f"cannot read '{item}' of checkpoint step {step} in {manager.directory}: "
            f"{type(e).__name__}: {e}") from e


def check_decoder(manager: ocp.CheckpointManager, step: int, current: dict[str, str]) -> None:
    """Raises DecoderMismatchError when the checkpoint's decoder is not `current`."""
    check_decoder_item(_restore_json(manager, step, "decoder"), current, step, manager.directory)


def check_decoder_item(saved: dict, current: dict[str, str], step: int, directory: Any) -> None:
    """Raises DecoderMismatchError when a checkpoint's saved decoder item is not `current`."""
    if saved.get("identity") != current["identity"]:
        raise DecoderMismatchError(
            f"the checkpoint at step {step} in {directory} was trained against the decoder "
            f"{saved.get('path')!r} (weights hash {saved.get('identity')}), but this run loaded "
            f"{current['path']!r} (weights hash {current['identity']}). An encoder only makes sense "
            f"with its own decoder: point decoder.path at the original folder, or use a new workdir.")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any | None) -> Any:
    """The TrainState of `step` (sharded like `abstract_state`); sets `data_iterator`'s position.

    Any failure is a CheckpointError naming the step and the cause.
    """
    import grain

    args = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
        out = manager.restore(int(step), args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - a failed restore must stop the run, loudly
        raise CheckpointError(
            f"failed to restore checkpoint step {step} from {manager.directory}: "
            f"{type(e).__name__}: {_first_line(e)} (the run stops rather than start from scratch; "
            f"nothing was changed in the workdir)") from e
    return out["state"]


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else ""


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def resolve_checkpoint_path(path: str | Path) -> tuple[Path, int]:
    """WORKDIR (latest step) or WORKDIR/checkpoints/STEP -> (workdir, step)."""
    p = Path(path).expanduser().resolve()
    if p.name.isdigit() and p.parent.name == "checkpoints":
        if not p.is_dir():
            raise CheckpointError(f"no checkpoint folder {p}")
        return p.parent.parent, int(p.name)
    if (p / "checkpoints").is_dir():
        steps = sorted(int(q.name) for q in (p / "checkpoints").iterdir()
                       if q.is_dir() and q.name.isdigit())
        if steps:
            return p, steps[-1]
    raise CheckpointError(
        f"{p} is neither a run workdir with checkpoints nor WORKDIR/checkpoints/STEP")


# ---------------------------------------------------------------------------------------------------
# The resume guard: a resumed run must be the run that was checkpointed.


class ConfigChangedError(CheckpointError):
    """A resumed run's config differs from its checkpoint's in fields that change the training."""


def flat_json(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'lr.peak': 0.001, ...}: the leaves of a JSON dict (lists/tuples as lists, via JSON)."""
    out: dict[str, Any] = {}
    for key, value in json.loads(json.dumps(tree, default=str)).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_json(value, name + "."))
        else:
            out[name] = value
    return out


def _covered(key: str, patterns: tuple[str, ...]) -> bool:
    """`key` is one of `patterns` or inside one of them (a group: 'log' covers 'log.every_steps')."""
    return any(key == p or key.startswith(p.rstrip(".") + ".") for p in patterns if p)


_ABSENT = "(absent)"


def config_changes(saved: dict, current: dict, free: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """{key: (checkpoint's value, this run's value)} for every field that differs, `free` ones aside."""
    old, new = flat_json(saved), flat_json(current)
    return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
            if old.get(k, _ABSENT) != new.get(k, _ABSENT) and not _covered(k, free)}


def check_config(saved: dict, current: dict, *, step: int, directory: Any, free: tuple[str, ...] = (),
                 allowed: tuple[str, ...] = (), opt_in: str = "--config.resume.allow_changes"
                 ) -> dict[str, tuple[Any, Any]]:
    """The changes a resume accepts (those in `allowed`); ConfigChangedError naming every other one.

    `free`: fields that never matter to the training (logging, how often to save, evaluators).
    """
    changes = config_changes(saved, current, free)
    refused = {k: v for k, v in changes.items() if not _covered(k, allowed)}
    if refused:
        listed = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in refused.items())
        raise ConfigChangedError(
            f"the checkpoint at step {step} in {directory} was trained with another config ({listed}); "
            f"resuming would change the optimisation or the data stream mid-run. Run with the "
            f"checkpoint's values, accept the change with {opt_in}={','.join(refused)} (recorded in "
            f"the workdir's history.jsonl), or train in a new workdir")
    return changes


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value) if value is not _ABSENT else value
    return text if len(text) <= width else text[:width - 3] + "..."
