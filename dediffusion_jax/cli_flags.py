"""One way of reading the command line, shared by the trainer (dediffusion_jax/train/cli.py) and the
launchers (launch/*.py), which pass the trainer's `--config.KEY=VALUE` overrides through unchanged.

Standard library only, Python >= 3.8: the launchers import it on machines without the project's venv.

Grammar of a config override (ml_collections' config_flags, made unambiguous):
  --config.KEY=VALUE        any field
  --config.KEY VALUE        the next token is the value unless it starts with `--` (so `-1e-4` is one)
  --config.KEY              a bool field set to true (a bare flag followed by `--...` or nothing)
  --noconfig.KEY            a bool field set to false
Everything after a lone `--` is passed on untouched.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

HELP_FLAGS = ("-h", "--help", "--helpfull", "--helpshort")
_PREFIXES = (("--config.", False), ("--noconfig.", True))


class Override(NamedTuple):
    key: str                    # 'encoder.num_queries'
    value: Optional[str]        # None: a bare boolean flag (true)
    tokens: Tuple[str, ...]     # the argv tokens it came from, e.g. ('--config.lr', '-1e-4')

    def normalized(self) -> str:
        """The one-token form: `--config.KEY=VALUE` or `--config.KEY`."""
        return f"--config.{self.key}" if self.value is None else f"--config.{self.key}={self.value}"


def parse_overrides(argv: Sequence[str]) -> Tuple[List[str], List[Override], List[str]]:
    """(own tokens, config overrides in order, tokens after a lone `--`)."""
    own: List[str] = []
    overrides: List[Override] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return own, overrides, argv[i + 1:]
        for prefix, negated in _PREFIXES:
            if tok.startswith(prefix):
                body = tok[len(prefix):]
                if "=" in body:
                    key, value = body.split("=", 1)
                    overrides.append(Override(key, value, (tok,)))
                elif negated:
                    overrides.append(Override(body, "false", (tok,)))
                elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    overrides.append(Override(body, argv[i + 1], (tok, argv[i + 1])))
                    i += 1
                else:
                    overrides.append(Override(body, None, (tok,)))
                break
        else:
            own.append(tok)
        i += 1
    return own, overrides, []


def split_passthrough(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(a launcher's own flags, the tokens it passes to the trainer unchanged and in order)."""
    own, overrides, rest = parse_overrides(argv)
    return own, [t for o in overrides for t in o.tokens] + rest


def option_value(argv: Sequence[str], name: str) -> Optional[str]:
    """The value of `--name=V` or `--name V` (the last one given), or None."""
    found = None
    argv = list(argv)
    for i, tok in enumerate(argv):
        if tok == "--":
            break
        if tok.startswith(f"--{name}="):
            found = tok.split("=", 1)[1]
        elif tok == f"--{name}" and i + 1 < len(argv):
            found = argv[i + 1]
    return found


def wants_help(argv: Sequence[str]) -> bool:
    """-h / --help / --helpfull / --helpshort anywhere before a lone `--`."""
    for tok in argv:
        if tok == "--":
            return False
        if tok in HELP_FLAGS:
            return True
    return False


def answer_help_early(build_parser: Callable[[], Any], argv: Optional[Sequence[str]] = None) -> None:
    """For a program whose module imports jax at the top: call it under `if __name__ == "__main__":`
    BEFORE those imports, so `--help` prints the usage and exits 0 with nothing heavy imported."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        build_parser().print_help()
        raise SystemExit(0)
