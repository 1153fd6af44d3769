"""`python -m dediffusion_jax.train --config configs/EXP.py[:ARG] --workdir DIR [--config.key=value ...]`

Trains De-Diffusion (or resumes the run in DIR). The config is a locked ml_collections file; every
override is checked BEFORE anything heavy starts, and user errors (unknown key, wrong type, missing or
invalid decoder folder, bad data spec) end with one `error: ...` line and exit status 2, no traceback.
A checkpoint that cannot be restored, or was trained against another decoder, exits with status 1.
SIGTERM (pre-emption) saves a checkpoint and exits 0; run the same command again to resume.

Multi-host: every process runs the same command; jax.distributed is started from
--coordinator_address/--num_processes/--process_id, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, or a launcher JAX detects (SLURM, Open MPI, Cloud TPU).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ml_collections

USAGE = ("usage: python -m dediffusion_jax.train --config configs/EXP.py[:ARG] --workdir DIR "
         "[--config.KEY=VALUE ...]")


class UsageError(ValueError):
    """A mistake in the command line or config: reported as one line, exit status 2."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """'configs/paper.py:runlocal' -> get_config('runlocal') of that file (as config_flags does)."""
    path, _, arg = spec.partition(":")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"_dd_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a broken config file is a user error with its cause
        raise UsageError(f"cannot load config file {path}: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise UsageError(f"{path} defines no get_config(arg)")
    return module.get_config(arg) if arg else module.get_config()


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} for every field, leaves and sub-dicts."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = prefix + k
        out[key] = v
        if isinstance(v, ml_collections.ConfigDict):
            out.update(flat_keys(v, key + "."))
    return out


def _overrides(argv: list[str]) -> list[tuple[str, str | None, str]]:
    """(key, value or None for bare boolean flags, original text) of every --config.KEY option."""
    out = []
    i = 0
    while i < len(argv):
        a = argv[i]
        for prefix, neg in (("--config.", False), ("--noconfig.", True)):
            if a.startswith(prefix):
                body = a[len(prefix):]
                if "=" in body:
                    key, value = body.split("=", 1)
                elif neg:
                    key, value = body, "false"
                elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    key, value = body, argv[i + 1]
                else:
                    key, value = body, None
                out.append((key, value, a))
        i += 1
    return out


def _config_spec(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _check_value(key: str, current: Any, value: str | None) -> None:
    if value is None:
        if not isinstance(current, bool):
            raise UsageError(f"--config.{key} needs a value (it is {type(current).__name__})")
        return
    kind = type(current)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
        elif kind is int:
            int(value)
        elif kind is float:
            float(value)
    except ValueError:
        raise UsageError(f"--config.{key}={value!r}: {key} expects {kind.__name__} "
                         f"(current value {current!r})") from None
    if isinstance(current, ml_collections.ConfigDict):
        raise UsageError(f"--config.{key} is a group of fields, not a value; set one of: "
                         + ", ".join(f"{key}.{k}" for k in current.keys()))


def validate_command_line(argv: list[str]) -> ml_collections.ConfigDict:
    """Loads the config and checks every --config.KEY override (exists, right type). Raises UsageError."""
    spec = _config_spec(argv)
    if spec is None:
        raise UsageError("missing --config\n" + USAGE)
    if not any(a == "--workdir" or a.startswith("--workdir=") for a in argv):
        raise UsageError("missing --workdir\n" + USAGE)
    config = load_config_file(spec)
    keys = flat_keys(config)
    for key, value, text in _overrides(argv):
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join('config.' + c for c in close)}?" if close else (
                "; see the config file for the fields")
            raise UsageError(f"unknown config key config.{key} (in {text}){hint}")
        _check_value(key, keys[key], value)
    return config


def _run(argv: list[str]) -> int:
    from absl import app, flags, logging as absl_logging
    from ml_collections import config_flags

    flags_ = flags.FLAGS
    if "config" not in flags_:
        config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]", lock_config=True)
        flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, samples")
        flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port")
        flags.DEFINE_integer("num_processes", None, "jax.distributed: number of processes")
        flags.DEFINE_integer("process_id", None, "jax.distributed: this process's index")
    result = {"rc": 0}

    def main(_argv: list[str]) -> None:
        # Our progress at INFO; orbax/absl chatter (one line per file written) only from WARNING up.
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("dediffusion_jax").setLevel(logging.INFO)
        import jax

        from dediffusion_jax.parallel import multihost

        multihost.initialize_distributed(flags_.coordinator_address, flags_.num_processes,
                                         flags_.process_id)
        # Persistent compilation cache: a resumed or repeated run skips most of the compile time.
        # DEDIFFUSION_JAX_CACHE=off disables it. Off with several processes: a resumed 2-process CPU
        # run was seen stalling in process 1's cache-writing compile (twice; fine with the cache off).
        cache = os.environ.get("DEDIFFUSION_JAX_CACHE", str(Path.home() / ".cache" / "dediffusion_jax"))
        if cache != "off" and jax.process_count() == 1:
            jax.config.update("jax_compilation_cache_dir", str(Path(cache) / "jax_compilation_cache"))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        result["rc"] = run_training(flags_.config, flags_.workdir)

    # config_flags finds the --config.KEY overrides in sys.argv at parse time (not in app.run's argv).
    saved_argv = sys.argv
    sys.argv = list(argv)
    try:
        app.run(main, argv=argv)
    except SystemExit as e:  # app.run exits when main returns
        return int(e.code or 0) or result["rc"]
    finally:
        sys.argv = saved_argv
    return result["rc"]


def run_training(config: ml_collections.ConfigDict, workdir: str) -> int:
    """train_and_evaluate with user errors as one line (2) and checkpoint errors as one line (1)."""
    from dediffusion_jax.t2i.folder import DecoderFolderError
    from dediffusion_jax.train import checkpoint as ckpt_lib
    from dediffusion_jax.train import loop

    try:
        decoder = loop.load_decoder_for(config)
        loop.train_and_evaluate(config, workdir, decoder=decoder)
    except DecoderFolderError as e:
        print(f"error: invalid decoder (config.decoder.path={config.decoder.path!r}): {e}",
              file=sys.stderr)
        return 2
    except ckpt_lib.CheckpointError as e:
        logging.getLogger(__name__).error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # config values that do not fit (data spec, batch vs mesh, context, ...)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    try:
        validate_command_line(argv[1:])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _run(argv)
