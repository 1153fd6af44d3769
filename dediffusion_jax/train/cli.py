"""`python -m dediffusion_jax.train --config configs/EXP.py[:ARG] --workdir DIR [--config.key=value ...]`

Trains De-Diffusion (or resumes the run in DIR). The config is a locked ml_collections file; every
override is checked BEFORE anything heavy starts, and user errors (unknown key, wrong type, missing or
invalid decoder folder, bad data spec) end with one `error: ...` line and exit status 2, no traceback.
A checkpoint that cannot be restored, or was trained against another decoder, exits with status 1.
SIGTERM (pre-emption) saves a checkpoint and exits 0; run the same command again to resume.
`--help` lists every config field (type, default, meaning); `--config FILE[:ARG] --help` shows that
file's docstring, its typed arguments and the values it sets; neither imports jax.

Multi-host: every process runs the same command; jax.distributed is started from
--coordinator_address/--num_processes/--process_id, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, or a launcher JAX detects (SLURM, Open MPI, Cloud TPU).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ml_collections

from dediffusion_jax import cli_flags
from dediffusion_jax import config as config_lib
from dediffusion_jax import errors
from dediffusion_jax.errors import UserError

USAGE = ("usage: python -m dediffusion_jax.train --config configs/EXP.py[:ARG] --workdir DIR "
         "[--config.KEY=VALUE ...]")


class UsageError(UserError, ValueError):
    """A mistake in the command line or config: reported as one line, exit status 2."""


def load_config_module(path: str) -> Any:
    """The config file as a module (its get_config, its docstring, its ARGS if it has typed arguments)."""
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
    return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """'configs/paper.py:runlocal' -> get_config('runlocal') of that file (as config_flags does).

    A bad argument string (unknown key, wrong type, bad choice) is a UsageError naming the file."""
    path, _, arg = spec.partition(":")
    module = load_config_module(path)
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as e:  # config_lib.ConfigArgError and the file's own checks
        raise UsageError(f"{path}:{arg}: {e}") from e


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} for every field, leaves and sub-dicts."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = prefix + k
        out[key] = v
        if isinstance(v, ml_collections.ConfigDict):
            out.update(flat_keys(v, key + "."))
    return out


def _tuple_item_type(key: str, current: tuple) -> type | None:
    if key in config_lib.TUPLE_ITEM_TYPES:
        return config_lib.TUPLE_ITEM_TYPES[key]
    return float if current and isinstance(current[0], (int, float)) else (
        str if current and isinstance(current[0], str) else None)


def _parse_tuple(value: str) -> tuple | None:
    """As ml_collections' TupleParser reads a command-line tuple; None where it would fail."""
    try:
        parsed = ast.literal_eval(value)
    except ValueError:
        parsed = value
    except SyntaxError:
        if "," in value or " " in value:
            return None
        parsed = value
    if isinstance(parsed, (tuple, list)):
        return tuple(parsed)
    return (parsed,)


def _check_tuple(key: str, current: tuple, value: str) -> None:
    item = _tuple_item_type(key, current)
    parsed = _parse_tuple(value)
    ok = parsed is not None and (item is None or all(
        isinstance(x, str) if item is str else isinstance(x, (int, float)) and not isinstance(x, bool)
        for x in parsed))
    if not ok:
        example = "\"('a', 'b')\"" if item is str else "'(0.5, 1.0)'"
        raise UsageError(f"--config.{key}={value!r}: {key} expects a tuple of "
                         f"{item.__name__ if item else 'values'}, e.g. --config.{key}={example} "
                         f"(current value {_short(current)})")


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
    if isinstance(current, tuple):
        _check_tuple(key, current, value)
    if isinstance(current, ml_collections.ConfigDict):
        raise UsageError(f"--config.{key} is a group of fields, not a value; set one of: "
                         + ", ".join(f"{key}.{k}" for k in current.keys()))


def validate_command_line(argv: list[str]) -> ml_collections.ConfigDict:
    """Loads the config and checks every --config.KEY override (exists, right type). Raises UsageError."""
    spec = cli_flags.option_value(argv, "config")
    if spec is None:
        raise UsageError("missing --config\n" + USAGE)
    if not any(a == "--workdir" or a.startswith("--workdir=") for a in argv):
        raise UsageError("missing --workdir\n" + USAGE)
    config = load_config_file(spec)
    check_overrides(config, argv)
    return config


def check_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    """Every --config.KEY override of argv names a field of `config` and fits its type (UsageError)."""
    keys = flat_keys(config)
    for key, value, tokens in cli_flags.parse_overrides(argv)[1]:
        text = " ".join(tokens)
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join('config.' + c for c in close)}?" if close else (
                "; see the config file for the fields")
            raise UsageError(f"unknown config key config.{key} (in {text}){hint}")
        _check_value(key, keys[key], value)


def config_from_argv(spec: str, argv: list[str]) -> ml_collections.ConfigDict:
    """The config `--config SPEC` plus the `--config.KEY=VALUE` overrides in argv, checked and then
    read by ml_collections' config_flags exactly as the trainer reads them: for commands that take a
    run's config beside the trainer (`python -m dediffusion_jax.encode_latents`). Raises UsageError."""
    from absl import flags
    from ml_collections import config_flags

    check_overrides(load_config_file(spec), argv)
    overrides = [o.normalized() for o in cli_flags.parse_overrides(argv)[1]]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file[:arg]", flag_values=values,
                                    lock_config=True)
    argv = ["prog", "--config", spec, *overrides]
    saved_argv = sys.argv
    sys.argv = argv  # config_flags reads the overrides from sys.argv at parse time
    try:
        values(argv)
    finally:
        sys.argv = saved_argv
    return values.config


# ------------------------------------------------------------------------------------------- --help

FLAGS_HELP = """flags:
  --config FILE[:ARG]        experiment config file and its argument string (see --config FILE --help)
  --workdir DIR              run folder: checkpoints, metrics, samples (resumes the run found there)
  --config.KEY=VALUE         override one field below (bool: --config.KEY / --noconfig.KEY;
                             tuple: --config.KEY='(a, b)')
  --coordinator_address H:P, --num_processes N, --process_id I
                             jax.distributed (multi-host; also from JAX_* variables or SLURM/MPI/TPU)
  --debug                    a user error (bad path, file, value) with its traceback, not one line
  -h, --help                 this text; with --config FILE[:ARG], that file's arguments and values"""


def _short(value: Any, width: int = 44) -> str:
    text = repr(tuple(value) if isinstance(value, (list, tuple)) else value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _type_name(key: str, value: Any) -> str:
    if isinstance(value, (tuple, list)):
        item = _tuple_item_type(key, tuple(value))
        return f"tuple[{item.__name__}]" if item else "tuple"
    return type(value).__name__


def schema_help(config: ml_collections.ConfigDict | None = None) -> str:
    """Every config field: key, type, value (this config's, or the default), meaning."""
    defaults = config_lib.leaf_fields(config_lib.base_config())
    values = config_lib.leaf_fields(config) if config is not None else defaults
    lines = []
    for key, value in values.items():
        doc = config_lib.FIELD_DOCS.get(key, "(set by this config file; not in the schema)")
        if key in defaults and config is not None and _differs(value, defaults[key]):
            doc += f" [default {_short(defaults[key], 24)}]"
        lines.append(f"  {key:<40} {_type_name(key, value):<11} {_short(value):<24} {doc}")
    return "\n".join(lines)


def _differs(a: Any, b: Any) -> bool:
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return norm(a) != norm(b)


def config_file_help(spec: str) -> str:
    """A config file's docstring, its typed arguments and what it sets (differences from the schema)."""
    path, _, arg = spec.partition(":")
    module = load_config_module(path)
    config = load_config_file(spec)
    out = [f"config file {path}" + (f" (argument string {arg!r})" if arg else ""), "",
           (module.__doc__ or "(no docstring)").strip(), ""]
    args = getattr(module, "ARGS", None)
    if args:
        out.append(f"arguments ({path}:KEY=VALUE,KEY2=VALUE2,...; a bool also as a bare KEY):")
        out += [f"  {k:<14} {config_lib.arg_type_name(v):<22} default {_short(str(v) if isinstance(v, config_lib.OneOf) else v)}"
                for k, v in args.items()]
    else:
        out.append("arguments: this file declares no typed ARGS; read its docstring")
    defaults = config_lib.leaf_fields(config_lib.base_config())
    values = config_lib.leaf_fields(config)
    out += ["", "values this config sets that differ from the defaults (dediffusion_jax/config.py):"]
    out += [f"  {k:<40} {_short(v, 60)}   (default {_short(defaults[k], 30)})" if k in defaults
            else f"  {k:<40} {_short(v, 60)}   (not in the schema)"
            for k, v in values.items() if k not in defaults or _differs(v, defaults[k])]
    out += ["", "all config fields (KEY, type, value in this config, meaning):", schema_help(config)]
    return "\n".join(out)


def help_text(argv: list[str]) -> str:
    spec = cli_flags.option_value(argv, "config")
    about = (__doc__ or "").strip().split("\n\n", 1)[-1]  # the first paragraph repeats USAGE
    head = f"{USAGE}\n\n{about}\n\n{FLAGS_HELP}\n"
    if spec:
        return head + "\n" + config_file_help(spec)
    return (head + "\nconfig fields (KEY, type, default, meaning; `--config FILE --help` shows a file's "
            "arguments and values):\n" + schema_help())


def _run(argv: list[str], debug: bool = False) -> int:
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
        result["rc"] = run_training(flags_.config, flags_.workdir, debug=debug)

    # One reading of the overrides for the check above and for absl: each becomes one
    # `--config.KEY=VALUE` token, so `--config.remat false` cannot mean true to absl.
    own, overrides, rest = cli_flags.parse_overrides(argv)
    argv = own + [o.normalized() for o in overrides] + (["--", *rest] if rest else [])
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


def run_training(config: ml_collections.ConfigDict, workdir: str, debug: bool = False) -> int:
    """train_and_evaluate with user errors as one `error: ...` line: status 2, or 1 for a checkpoint
    that cannot be used (CheckpointError). A ValueError counts as the user's here (config
    values that do not fit: data spec, batch vs mesh, context, ...). `debug`: tracebacks instead."""
    from dediffusion_jax.t2i.folder import DecoderFolderError
    from dediffusion_jax.train import checkpoint as ckpt_lib
    from dediffusion_jax.train import loop

    try:
        decoder = loop.load_decoder_for(config)
        loop.train_and_evaluate(config, workdir, decoder=decoder)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the user's
        if debug or not (errors.is_user_error(e) or isinstance(e, ValueError)):
            raise
        text = errors.message(e)
        if isinstance(e, DecoderFolderError):
            text = f"invalid decoder (config.decoder.path={config.decoder.path!r}): {text}"
        print(f"error: {text}", file=sys.stderr, flush=True)
        return 1 if isinstance(e, ckpt_lib.CheckpointError) else 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if cli_flags.wants_help(argv[1:]):
        try:
            print(help_text(argv[1:]))
        except BrokenPipeError:  # `--help | head`
            pass
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    debug = errors.debug_requested(argv[1:])
    argv = [a for a in argv if a != errors.DEBUG_FLAG]
    try:
        validate_command_line(argv[1:])
    except UsageError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _run(argv, debug)
