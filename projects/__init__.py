"""Experiments built on the dediffusion_jax core (scenic style: one folder a project). The core never
imports a project; a project plugs in through the config's `imports` (dediffusion_jax/extensions.py)."""
