"""`python -m dediffusion_jax.train ...`: see dediffusion_jax/train/cli.py."""

import sys

from dediffusion_jax.train.cli import main

sys.exit(main())
