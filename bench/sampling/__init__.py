"""Text-to-image sampling throughput (issue 21): our jitted DDIM + classifier-free guidance sampler
against diffusers' StableDiffusionPipeline on the same device, weights and noise.

A package, not a module of bench/: `python -m bench.sampling` (cli.py parses without jax, run.py times
ours, torch_side.py builds and times diffusers' pipeline from the same Flax params)."""
