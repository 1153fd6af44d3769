"""`python -m bench.sampling`: answers --help before jax or torch is imported."""

import os
import sys

from dediffusion_jax.cli_flags import answer_help_early

from bench.sampling.cli import build_parser

answer_help_early(build_parser)
if "torch" in sys.argv:  # --compare torch: JAX would take 75% of the GPU up front and starve torch
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # (in this same process)

from bench.sampling.run import main  # noqa: E402

main()
