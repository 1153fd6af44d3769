"""Shared config schema for De-Diffusion training runs (every field a run reads, with defaults).

Experiment files (configs/paper.py, projects/miniworld/configs/world.py) start from `base_config()`, set their values
and return it LOCKED: a typo in an override (`--config.encoder.num_querys=15`) is an error naming the
close match, never a silently ignored new field. Fields that mean "not set" use '' or 0, never None
(ml_collections cannot override a None field from the command line).
"""

from __future__ import annotations

import ml_collections

from dediffusion_jax.train import optimizer as optimizer_lib


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 32                     # global, over all processes
    c.dtype = "float32"                   # compute dtype of the encoder (params stay float32)
    c.remat = False
    # Modules imported before data and evaluators are built: how a project registers its data-source
    # prefixes and evaluators (dediffusion_jax/extensions.py). The core never imports a project.
    c.imports = ()

    # Frozen text-to-image decoder: a diffusers-format folder (SD 1.x/2.x, or the miniworld decoder).
    c.decoder = ml_collections.ConfigDict(dict(path=""))

    # Encoder backbone. ABLATIONS: backbone.init='' = random init; backbone.frozen=False trains it.
    c.backbone = ml_collections.ConfigDict(dict(
        variant="B/16", image_size=224, init="", frozen=True,
        # 0 = keep the variant's value; used by small local configs.
        overrides=ml_collections.ConfigDict(dict(
            hidden_size=0, num_layers=0, num_heads=0, mlp_dim=0)),
    ))
    # Attentional pooler + vocabulary head. ABLATIONS: num_queries (tokens), pooler_blocks (depth).
    c.encoder = ml_collections.ConfigDict(dict(
        num_queries=75, pooler_blocks=5, pooler_width=1024, pooler_heads=16, mlp_ratio=4))
    # ABLATION: vocab.exclude_punctuation.
    # only_tokens: when non-empty, the encoder may emit these vocabulary entries only.
    c.vocab = ml_collections.ConfigDict(dict(exclude_punctuation=True, exclude_tokens=(), only_tokens=()))
    c.quantizer = ml_collections.ConfigDict(dict(
        hard=True, token_path="fused", rows_per_chunk=16,
        # Not in the paper (0 = off): weight of a wav2vec-2.0-style slot-diversity term that keeps
        # small from-scratch encoders from mapping every image to one text (train/model.py).
        diversity_weight=0.0,
        temperature=ml_collections.ConfigDict(dict(schedule="exponential", start=2.0, end=0.3))))

    # The denoising loss. timestep_range: the fractions [lo, hi) of the decoder's training timesteps
    # the loss samples from, uniformly (the paper: one random noise level per sample, the whole range).
    # timestep_range_final (empty = off): a curriculum; the window slides linearly to it over the
    # first timestep_ramp_fraction of total_steps (not in the paper; docs/miniworld.md, "Timesteps").
    # reduction: "mean" (the paper) or "log_mean" (each example's log MSE; train/model.py).
    c.loss = ml_collections.ConfigDict(dict(timestep_range=(0.0, 1.0), timestep_range_final=(),
                                            timestep_ramp_fraction=1.0, reduction="mean"))

    # optimizer.*, lr.*, total_steps: see dediffusion_jax/train/optimizer.py (paper defaults).
    opt = optimizer_lib.default_config()
    c.optimizer = opt.optimizer
    c.optimizer.eps = 1e-30               # adafactor: added to g^2; adamw: use 1e-8
    c.optimizer.wd_include = tuple(c.optimizer.wd_include)
    c.lr = opt.lr
    c.total_steps = opt.total_steps

    # Data: a source spec (dediffusion_jax/data/sources.py SPEC_FORMS, or a prefix an import registers).
    c.data = ml_collections.ConfigDict(dict(
        source="", shuffle=True, worker_count=0, read_threads=4,
        # Decoder view size: 0 = the decoder's own image size.
        preprocess=ml_collections.ConfigDict(dict(augment=False, decoder_size=0)),
    ))
    # Device mesh: one axis may be -1 (auto). mesh.frozen_fsdp shards the frozen decoder/backbone.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, frozen_fsdp=False))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
    # Evaluators run during training (dediffusion_jax/evaluation/evaluators.py), big_vision style:
    # {NAME: {"type": REGISTERED_TYPE, "every_steps": N (0: only at the end), ...its arguments}}.
    c.evals = ml_collections.ConfigDict()
    c.log = ml_collections.ConfigDict(dict(
        every_steps=1,          # metrics.jsonl / TensorBoard
        progress_every=50,      # console line with ETA
        samples_every=500,      # De-Diffusion texts of a few fixed images -> samples.jsonl
        num_samples=4,
        tensorboard=True,
    ))
    return c


def parse_arg(arg: str | None) -> dict[str, str]:
    """'runlocal,decoder=/path' -> {'runlocal': '', 'decoder': '/path'}."""
    out: dict[str, str] = {}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip()
    return out
