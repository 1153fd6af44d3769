"""Shared config schema for De-Diffusion training runs (every field a run reads, with defaults).

Experiment files (configs/paper.py, projects/miniworld/configs/world.py) start from `base_config()`, set their values
and return it LOCKED: a typo in an override (`--config.encoder.num_querys=15`) is an error naming the
close match, never a silently ignored new field. Fields that mean "not set" use '' or 0, never None
(ml_collections cannot override a None field from the command line).
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections
from dediffusion_jax.errors import UserError

# No jax here: `train --help` and the config files load this module without starting anything heavy.


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 32                     # global, over all processes
    c.dtype = "float32"                   # compute dtype of encoder and decoder (params stay float32)
    c.remat = False
    # Modules imported before data and evaluators are built: how a project registers its data-source
    # prefixes and evaluators (dediffusion_jax/extensions.py). The core never imports a project.
    c.imports = ()

    # Frozen text-to-image decoder: a diffusers-format folder (SD 1.x/2.x, or the miniworld decoder).
    c.decoder = ml_collections.ConfigDict(dict(
        path="",
        # The UNet's convolution kernels flipped once for its input gradient: auto (CPU only) | on | off.
        flip_conv_kernels="auto"))

    # Encoder backbone. ABLATIONS: backbone.init='' = random init; backbone.frozen=False trains it.
    c.backbone = ml_collections.ConfigDict(dict(
        variant="B/16", image_size=224, init="", frozen=True,
        # The backbone view's normalisation, (x/255 - mean) / std; () = the backbone's own
        # (its folder's preprocessor_config.json, else CLIP's): models/build.backbone_normalisation.
        mean=(), std=(),
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
        # rows_per_chunk: query rows of the fused token path computed at once per device (0 = as many
        # as keep its [rows, V] float32 temporaries within chunk_budget_mb; models/quantizer.py).
        hard=True, token_path="fused", rows_per_chunk=0, chunk_budget_mb=64.0,
        # Not in the paper (0 = off): weight of a wav2vec-2.0-style slot-diversity term that keeps
        # small from-scratch encoders from mapping every image to one text (models/dediffusion.py).
        diversity_weight=0.0,
        temperature=ml_collections.ConfigDict(dict(schedule="exponential", start=2.0, end=0.3))))

    # The denoising loss. timestep_range: the fractions [lo, hi) of the decoder's training timesteps
    # the loss samples from, uniformly (the paper: one random noise level per sample, the whole range).
    # timestep_range_final (empty = off): a curriculum; the window slides linearly to it over the
    # first timestep_ramp_fraction of total_steps (not in the paper; docs/miniworld.md, "Timesteps").
    # reduction: "mean" (the paper) or "log_mean" (each example's log MSE; models/dediffusion.py).
    c.loss = ml_collections.ConfigDict(dict(timestep_range=(0.0, 1.0), timestep_range_final=(),
                                            timestep_ramp_fraction=1.0, reduction="mean"))

    # optimizer.*, lr.*, total_steps: the paper's values; dediffusion_jax/train/optimizer.py reads them.
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adafactor", b1=0.9, b2=0.999,
        eps=1e-30,                        # adafactor: added to g^2; adamw: use 1e-8
        weight_decay=0.01, wd_include=(r"(.*/)?kernel",), grad_clip_norm=1.0,
        adafactor_decay_rate=0.8, adafactor_min_dim_to_factor=32, momentum_dtype="float32"))
    c.lr = ml_collections.ConfigDict(dict(
        schedule="warmup_cosine", peak=3e-4, end=3e-6, warmup_steps=10_000))
    c.total_steps = 500_000

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
    # A resumed run refuses a config that changes the optimisation or the data stream (issue 17);
    # the keys listed here (comma-separated, e.g. "total_steps,lr.peak") are changed on purpose.
    c.resume = ml_collections.ConfigDict(dict(allow_changes=""))
    return c



# One line per field of base_config(): what `train --help` prints (tests/test_configs.py checks that
# every field has one). Types and defaults come from base_config() itself.
FIELD_DOCS: dict[str, str] = {
    "seed": "random seed of parameters, Gumbel noise, timesteps and data order",
    "batch_size": "global batch size, over all processes",
    "dtype": "compute dtype of the encoder and the frozen decoder: float32 | bfloat16 (params stay float32)",
    "remat": "rematerialise (gradient-checkpoint) the encoder's, text encoder's and UNet's blocks to save activation memory",
    "imports": "modules imported before data and evaluators are built (how a project registers "
               "its data sources and evaluators)",
    "decoder.path": "the frozen text-to-image decoder: a diffusers-format folder",
    "decoder.flip_conv_kernels": "flip the frozen UNet's convolution kernels once for its input gradient "
                                 "instead of in every step: auto (CPU devices only) | on | off",
    "backbone.variant": "ViT of the encoder: <Ti|S|B|L|H>/<patch>",
    "backbone.image_size": "image size the backbone sees (pixels)",
    "backbone.init": "a transformers CLIPVisionModel folder to load; '' = random init (ablation)",
    "backbone.frozen": "keep the backbone frozen (the paper); False trains it",
    "backbone.mean": "view normalisation mean (RGB, [0,1] units); () = the backbone's own (its folder's "
                     "preprocessor_config.json, else CLIP's)",
    "backbone.std": "view normalisation std; () = the backbone's own (as backbone.mean)",
    "backbone.overrides.hidden_size": "0 = the variant's width; else this width (small local configs)",
    "backbone.overrides.num_layers": "0 = the variant's depth; else this depth",
    "backbone.overrides.num_heads": "0 = the variant's heads; else this many",
    "backbone.overrides.mlp_dim": "0 = the variant's MLP size; else this size",
    "encoder.num_queries": "text tokens the encoder writes (ablation: 5/15/45/75)",
    "encoder.pooler_blocks": "attentional pooler depth (ablation: 3/5/9)",
    "encoder.pooler_width": "attentional pooler width",
    "encoder.pooler_heads": "attentional pooler attention heads",
    "encoder.mlp_ratio": "pooler MLP size / width",
    "vocab.exclude_punctuation": "the encoder may not emit punctuation tokens (ablation)",
    "vocab.exclude_tokens": "vocabulary entries the encoder may not emit",
    "vocab.only_tokens": "when non-empty, the encoder may emit these vocabulary entries only",
    "quantizer.hard": "straight-through (hard) Gumbel-softmax; False = the soft relaxation",
    "quantizer.token_path": "fused (memory-lean custom VJP) | soft (reference formulation); same values",
    "quantizer.rows_per_chunk": "rows per device of the fused token path computed at once; 0 = the most "
                                "that fit quantizer.chunk_budget_mb (memory vs speed; same values)",
    "quantizer.chunk_budget_mb": "MB (10^6 bytes) the fused token path's [rows, V] float32 temporaries may "
                                 "take per device when rows_per_chunk = 0",
    "quantizer.diversity_weight": "weight of the slot-diversity term (not in the paper; 0 = off)",
    "quantizer.temperature.schedule": "Gumbel temperature schedule: constant | exponential | linear | cosine",
    "quantizer.temperature.start": "Gumbel temperature at step 0",
    "quantizer.temperature.end": "Gumbel temperature at total_steps",
    "loss.timestep_range": "fractions [lo, hi) of the decoder's training timesteps the loss samples from",
    "loss.timestep_range_final": "curriculum: the window slides to this range (empty = off)",
    "loss.timestep_ramp_fraction": "fraction of total_steps over which the window slides",
    "loss.reduction": "mean (the paper) | log_mean (mean of each example's log MSE)",
    "optimizer.name": "adafactor (the paper) | adamw",
    "optimizer.b1": "first-moment (momentum) decay",
    "optimizer.b2": "second-moment decay (Adafactor: its cap)",
    "optimizer.eps": "adafactor: added to g^2 (1e-30); adamw: added to sqrt(v) (use 1e-8)",
    "optimizer.weight_decay": "decoupled weight decay, multiplied by the learning rate",
    "optimizer.wd_include": "regexes of parameter paths that get weight decay (default: kernels)",
    "optimizer.grad_clip_norm": "global-norm clipping of the gradient; 0 disables",
    "optimizer.adafactor_decay_rate": "exponent of Adafactor's step-dependent b2 schedule",
    "optimizer.adafactor_min_dim_to_factor": "Adafactor factors second moments of dims at least this big",
    "optimizer.momentum_dtype": "float32 | bfloat16 (halves the momentum memory)",
    "lr.schedule": "warmup_cosine | constant (constant still honours warmup_steps)",
    "lr.peak": "peak learning rate",
    "lr.end": "learning rate reached at total_steps",
    "lr.warmup_steps": "linear warmup from 0 to peak",
    "total_steps": "training steps",
    "data.source": "data source spec (dediffusion_jax/data/sources.py, or a prefix an import registers)",
    "data.shuffle": "shuffle the training data",
    "data.worker_count": "grain worker processes (0 = in this process)",
    "data.read_threads": "grain read threads",
    "data.preprocess.augment": "random-crop/flip augmentation",
    "data.preprocess.decoder_size": "decoder view size; 0 = the decoder's own image size",
    "mesh.data": "devices on the data axis (-1 = all that are left)",
    "mesh.fsdp": "devices on the fsdp axis (-1 = all that are left)",
    "mesh.tensor": "devices on the tensor axis (-1 = all that are left)",
    "mesh.frozen_fsdp": "also shard the frozen decoder and backbone over fsdp",
    "checkpoint.every_steps": "save a checkpoint every this many steps",
    "checkpoint.keep": "checkpoints kept",
    "checkpoint.async_save": "save checkpoints in the background",
    "log.every_steps": "metrics.jsonl / TensorBoard every this many steps",
    "log.progress_every": "console progress line (with ETA) every this many steps",
    "log.samples_every": "De-Diffusion texts of a few fixed images -> samples.jsonl every this many steps",
    "log.num_samples": "images whose texts are logged",
    "log.tensorboard": "write TensorBoard event files",
    "resume.allow_changes": "config keys a resume may change on purpose, comma-separated (e.g. "
                            "total_steps,lr.peak); any other change is refused; recorded in history.jsonl",
}

# Item type of the tuple fields (an empty default does not say it): what a command-line override of
# the field must contain.
TUPLE_ITEM_TYPES: dict[str, type] = {
    "imports": str, "vocab.exclude_tokens": str, "vocab.only_tokens": str,
    "backbone.mean": float, "backbone.std": float,
    "loss.timestep_range": float, "loss.timestep_range_final": float, "optimizer.wd_include": str,
}


def leaf_fields(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{'encoder.num_queries': 75, ...}: every value field (no groups), in definition order."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(leaf_fields(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ------------------------------------------------------------------------ typed config-file arguments

class ConfigArgError(UserError, ValueError):
    """A config file's argument string is wrong (unknown key, value of the wrong type, bad choice)."""


class OneOf(str):
    """A string argument with a closed set of values; the first is the default.

    `parse_arg(arg, relax=one_of("soft", "hard"))` gives args.relax == "soft" unless arg says
    relax=hard; relax=straight is a ConfigArgError naming the choices.
    """

    choices: tuple[str, ...]

    def __new__(cls, *choices: str) -> "OneOf":
        self = super().__new__(cls, choices[0])
        self.choices = tuple(choices)
        return self


def one_of(*choices: str) -> OneOf:
    return OneOf(*choices)


def arg_type_name(default: Any) -> str:
    """'int', 'bool', 'str', 'soft|hard' (a OneOf): how `--help` names an argument's type."""
    if isinstance(default, OneOf):
        return "|".join(default.choices)
    return type(default).__name__


def _convert_arg(key: str, raw: str | None, default: Any) -> Any:
    kind = type(default)
    if isinstance(default, bool):
        if raw is None:
            return True
        if raw.lower() in ("true", "1"):
            return True
        if raw.lower() in ("false", "0"):
            return False
        raise ConfigArgError(f"{key}={raw!r}: {key} is a bool (write {key}, {key}=true or {key}=false)")
    if raw is None:
        raise ConfigArgError(f"{key} needs a value ({key}=<{arg_type_name(default)}>)")
    if isinstance(default, OneOf):
        if raw not in default.choices:
            raise ConfigArgError(f"{key}={raw!r}; choose {' or '.join(default.choices)}")
        return str(raw)
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise ConfigArgError(f"{key}={raw!r}: {key} expects {kind.__name__}") from None
    if kind is str:
        return raw
    raise TypeError(f"parse_arg: default of {key} is a {kind.__name__}; use bool, int, float, str "
                    f"or one_of(...)")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Typed config-file arguments, as big_vision's: parse_arg('tokens=6,punct', tokens=12, punct=False).

    The argument string is comma-separated `key=value` (a bool also as a bare `key`). Every key must be
    one of `defaults`; a value takes its default's type (bool: true/false/1/0; int; float; str;
    one_of(...): one of its choices). Anything else is ONE ConfigArgError naming the valid keys, or
    the key and its bad value. Returns a locked ConfigDict of every argument (default or given).
    """
    values = {k: (str(v) if isinstance(v, OneOf) else v) for k, v in defaults.items()}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, raw = part.partition("=")
        key = key.strip()
        if key not in defaults:
            valid = ", ".join(f"{k}=<{arg_type_name(v)}>" for k, v in defaults.items()) or "none"
            close = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigArgError(f"unknown config argument {key!r}; {hint}valid arguments: {valid}")
        values[key] = _convert_arg(key, raw.strip() if eq else None, defaults[key])
    args = ml_collections.ConfigDict(values)
    args.lock()
    return args
