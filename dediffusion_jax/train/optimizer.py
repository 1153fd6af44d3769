"""Optimizer and learning-rate schedule for the trainable encoder, from an ml_collections config.

Config fields (defaults in the config schema, `dediffusion_jax/config.py`; the paper's values):
  optimizer.name            'adafactor' (paper) | 'adamw'
  optimizer.b1              0.9    first-moment (momentum) decay
  optimizer.b2              0.999  second-moment decay (Adafactor: its cap, see below)
  optimizer.eps             1e-30 for adafactor (added to g^2), 1e-8 for adamw (added to sqrt(v))
  optimizer.weight_decay    0.01   decoupled, multiplied by the learning rate (as AdamW)
  optimizer.wd_include      regexes of param paths that get weight decay; default kernels only
  optimizer.grad_clip_norm  1.0    global-norm clipping of the raw gradient; 0 / None disables
  optimizer.adafactor_decay_rate        0.8  exponent of Adafactor's step-dependent b2 schedule
  optimizer.adafactor_min_dim_to_factor 32   factor second moments of dims at least this big
  optimizer.momentum_dtype  'float32' ('bfloat16' halves the momentum memory, as big_vision)
  lr.schedule               'warmup_cosine' | 'constant' (constant still honours warmup_steps)
  lr.peak                   3e-4
  lr.end                    3e-6   value reached at total_steps
  lr.warmup_steps           10_000 linear warmup from 0 to peak
  total_steps               500_000

Adafactor mapping (the paper says "Adafactor, beta1 0.9, beta2 0.999, decoupled weight decay",
the big_vision / "Scaling Vision Transformers" variant; optax.adafactor's own arguments do NOT
express it):
- beta2: optax's `decay_rate` is not a decay but an exponent, b2_t = 1 - (t+1)^-0.8. We keep that
  schedule (it is Adafactor's built-in bias correction) and cap it at optimizer.b2 = 0.999 through
  `scale_by_factored_rms(decay_rate_fn=...)`; the cap is reached after ~5.6K steps.
- beta1: `momentum=0.9` in optax terms, an EMA of the rms-scaled update without debiasing.
- no `multiply_by_parameter_scale` (the learning rate is an absolute step size, as in AdamW) and
  no per-block update clipping (global-norm gradient clipping replaces it).
- weight decay: added to the update before the learning rate multiplies it, so a step is
  -lr * (adafactor_update + wd * param), exactly AdamW's decoupled form.

Weight decay only on kernels (paths ending in 'kernel'): biases, LayerNorm scales/biases, token
and position embeddings and the pooler's learned queries are left alone, the usual ViT/BERT
practice, since shrinking offsets/gains or the query/embedding tables towards 0 only hurts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dediffusion_jax.config import base_config
from dediffusion_jax.parallel.sharding import path_str

DEFAULT_WD_INCLUDE: tuple[str, ...] = tuple(base_config().optimizer.wd_include)



def default_config() -> ml_collections.ConfigDict:
    """The paper's optimizer and schedule (the `optimizer`, `lr` and `total_steps` fields of the config
    schema, `dediffusion_jax.config`, where the defaults live); experiment configs override fields."""
    base = base_config()
    return ml_collections.ConfigDict({"optimizer": base.optimizer, "lr": base.lr,
                                      "total_steps": base.total_steps})


def _get(cfg: Any, name: str, default: Any) -> Any:
    value = cfg.get(name, default) if cfg is not None else default
    return default if value is None else value


def make_lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup 0 -> peak over warmup_steps, then cosine peak -> end at total_steps.

    'constant' keeps peak after the (optional) warmup.
    """
    lr = config.lr
    kind = _get(lr, "schedule", "warmup_cosine")
    peak = float(lr.peak)
    warmup = int(_get(lr, "warmup_steps", 0))
    if kind == "constant":
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
    if kind in ("warmup_cosine", "cosine"):
        total = int(config.total_steps)
        if total <= warmup:
            raise ValueError(f"total_steps ({total}) must exceed lr.warmup_steps ({warmup})")
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total,
            end_value=float(_get(lr, "end", 0.0)))
    raise ValueError(f"unknown lr.schedule {kind!r}; expected 'warmup_cosine' or 'constant'")


def weight_decay_mask(params: Any, include: Sequence[str] = DEFAULT_WD_INCLUDE) -> Any:
    """Bool tree: True where the '/'-joined param path fullmatches one of `include`."""
    patterns = [re.compile(p) for p in include]
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: any(p.fullmatch(path_str(kp)) for p in patterns), params)


def scale_by_adafactor(b1: float = 0.9, b2_cap: float = 0.999, decay_rate: float = 0.8,
                       min_dim_size_to_factor: int = 32, eps: float = 1e-30,
                       momentum_dtype: Any = jnp.float32) -> optax.GradientTransformation:
    """Adafactor direction with momentum b1 and the step-dependent b2 capped at `b2_cap`."""

    def decay_rate_fn(step: jax.Array, exponent: float) -> jax.Array:
        t = jnp.asarray(step, jnp.float32) + 1.0
        return jnp.minimum(b2_cap, 1.0 - t ** (-exponent))

    txs = [optax.scale_by_factored_rms(
        factored=True, decay_rate=decay_rate, min_dim_size_to_factor=min_dim_size_to_factor,
        epsilon=eps, decay_rate_fn=decay_rate_fn)]
    if b1:
        txs.append(optax.ema(b1, debias=False, accumulator_dtype=momentum_dtype))
    return optax.chain(*txs)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """clip(global norm) -> adafactor|adam direction -> + wd * kernel -> * -lr(step)."""
    opt = config.optimizer
    name = _get(opt, "name", "adafactor")
    b1 = float(_get(opt, "b1", 0.9))
    b2 = float(_get(opt, "b2", 0.999))
    if name == "adafactor":
        direction = scale_by_adafactor(
            b1=b1, b2_cap=b2, decay_rate=float(_get(opt, "adafactor_decay_rate", 0.8)),
            min_dim_size_to_factor=int(_get(opt, "adafactor_min_dim_to_factor", 32)),
            eps=float(_get(opt, "eps", 1e-30)),
            momentum_dtype=jnp.dtype(_get(opt, "momentum_dtype", "float32")))
    elif name == "adamw":
        direction = optax.scale_by_adam(b1=b1, b2=b2, eps=float(_get(opt, "eps", 1e-8)))
    else:
        raise ValueError(f"unknown optimizer.name {name!r}; expected 'adafactor' or 'adamw'")

    txs = []
    clip = _get(opt, "grad_clip_norm", 0.0)
    if clip:
        txs.append(optax.clip_by_global_norm(float(clip)))
    txs.append(direction)
    wd = float(_get(opt, "weight_decay", 0.0))
    if wd:
        include = tuple(_get(opt, "wd_include", DEFAULT_WD_INCLUDE))
        txs.append(optax.add_decayed_weights(wd, mask=lambda p: weight_decay_mask(p, include)))
    txs.append(optax.scale_by_learning_rate(make_lr_schedule(config)))
    return optax.chain(*txs)
