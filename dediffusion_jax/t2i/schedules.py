"""Noise schedules, training targets and a DDIM sampler with classifier-free guidance.

Why: the frozen decoder is trained (and De-Diffusion's loss computed) with the decoder's own schedule
and prediction type, read from its diffusers `scheduler_config.json`. These are pure functions of a
hashable `NoiseSchedule`, so they can be closed over or passed as static arguments under `jit`, and
their numbers match diffusers' DDIMScheduler / DDPMScheduler (tested in tests/test_schedules.py).

Conventions (as diffusers): integer timesteps t in [0, num_train_timesteps); alpha_bar_t =
`alphas_cumprod[t]`; x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps;
v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0. Arrays of any layout: per-example coefficients
broadcast over the trailing axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The scheduler config keys shared by DDIM/DDPM/PNDM/Euler configs; hashable (a static arg).

    `alphas_cumprod` is derived (float32, computed in float32 exactly as diffusers does, so the
    numbers agree to the last bit or two rather than to float64 truth).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    @classmethod
    def from_dict(cls, config_json: Mapping[str, Any]) -> NoiseSchedule:
        """Reads a diffusers scheduler_config.json; other keys are ignored, bad values raise."""
        if config_json.get("thresholding", False):
            raise ValueError("scheduler config key 'thresholding': True is not supported")
        # Field defaults are DDIMScheduler's: a missing key means the same here as there.
        v = {f.name: config_json.get(f.name, f.default) for f in dataclasses.fields(cls)}
        for key, allowed in (
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
        ):
            if v[key] not in allowed:
                raise ValueError(
                    f"scheduler config key {key!r}: {v[key]!r} is not one of {', '.join(allowed)}"
                )
        n = v["num_train_timesteps"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"scheduler config key 'num_train_timesteps': {n!r} is not a positive int")
        if v["trained_betas"] is not None:
            v["trained_betas"] = tuple(float(b) for b in v["trained_betas"])
            if len(v["trained_betas"]) != n:
                raise ValueError(
                    f"scheduler config key 'trained_betas' has {len(v['trained_betas'])} values, "
                    f"num_train_timesteps is {n}"
                )
        elif v["beta_schedule"] not in BETA_SCHEDULES:
            raise ValueError(
                f"scheduler config key 'beta_schedule': {v['beta_schedule']!r} is not one of "
                f"{', '.join(BETA_SCHEDULES)}"
            )
        for key in ("beta_start", "beta_end", "clip_sample_range"):
            v[key] = float(v[key])
        for key in ("set_alpha_to_one", "clip_sample", "rescale_betas_zero_snr"):
            if not isinstance(v[key], bool):
                raise ValueError(f"scheduler config key {key!r}: {v[key]!r} is not a bool")
        v["steps_offset"] = int(v["steps_offset"])
        return cls(**v)

    def to_dict(self) -> dict[str, Any]:
        """A scheduler_config.json that `diffusers.DDIMScheduler.from_config` accepts."""
        out: dict[str, Any] = {"_class_name": "DDIMScheduler"}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        out["thresholding"] = False
        return out

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """float32 betas, computed with diffusers' float32 arithmetic."""
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, np.float32)
        elif self.beta_schedule == "linear":
            betas = _torch_linspace_f32(self.beta_start, self.beta_end, n)
        elif self.beta_schedule == "scaled_linear":
            betas = _torch_linspace_f32(self.beta_start**0.5, self.beta_end**0.5, n) ** 2
        else:  # squaredcos_cap_v2: computed in Python floats, then stored as float32
            def alpha_bar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = np.asarray(
                [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                np.float32,
            )
        if self.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        return betas

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """alpha_bar_t for t = 0..T-1 as float32 numpy (torch's CPU cumprod accumulates in float64)."""
        return np.cumprod((np.float32(1.0) - self.betas).astype(np.float64)).astype(np.float32)

    @property
    def final_alpha_cumprod(self) -> float:
        """alpha_bar 'before' t=0, used by the last DDIM step: 1 or alpha_bar_0 (set_alpha_to_one)."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) bit for bit (symmetric float32 formula)."""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.asarray([start32], np.float32)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps)
    half = steps // 2
    # torch's vectorised CPU kernel fuses multiply-add: one rounding, emulated exactly in float64.
    lo = np.float64(start32) + np.float64(step) * idx[:half]
    hi = np.float64(end32) - np.float64(step) * (steps - 1 - idx[half:])
    return np.concatenate([lo, hi]).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """arXiv:2305.08891 Algorithm 1, in float32 like diffusers."""
    alphas_cumprod = np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32)
    alphas_bar_sqrt = np.sqrt(alphas_cumprod)
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def _coef(values: np.ndarray | jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
    """values[t] in `like`'s dtype, shaped to broadcast over `like`'s trailing axes."""
    a = jnp.asarray(values, like.dtype)[jnp.asarray(t)]
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise; t: int scalar or [B]."""
    a = _coef(schedule.alphas_cumprod, t, x0)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x_0 (the v-prediction target)."""
    a = _coef(schedule.alphas_cumprod, t, x0)
    return a**0.5 * noise - (1 - a) ** 0.5 * x0


def training_target(
    schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array
) -> jax.Array:
    """What the model is trained to output at x_t, by the schedule's prediction_type."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return x0


def predict_x0_and_eps(
    schedule: NoiseSchedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Turns a model output of any prediction_type into (x_0, eps) estimates (no clipping)."""
    a = _coef(schedule.alphas_cumprod, t, x_t)
    sa, sb = a**0.5, (1 - a) ** 0.5
    if schedule.prediction_type == "epsilon":
        return (x_t - sb * model_output) / sa, model_output
    if schedule.prediction_type == "v_prediction":
        return sa * x_t - sb * model_output, sa * model_output + sb * x_t
    return model_output, (x_t - sa * model_output) / sb


def sample_timesteps(
    rng: jax.Array, batch: int, schedule: NoiseSchedule, fraction_range: tuple[float, float] = (0.0, 1.0)
) -> jax.Array:
    """Training timesteps: uniform int32 in [0, num_train_timesteps), shape [batch].

    `fraction_range` (lo, hi) restricts them to [lo * T, hi * T): the decoder's own pre-training uses
    the whole range; an encoder trained through a frozen decoder may skip the low-noise steps, where the
    text barely changes the prediction (docs/miniworld.md, "Timesteps").
    """
    lo, hi = timestep_bounds(schedule, fraction_range)
    return jax.random.randint(rng, (batch,), lo, hi, dtype=jnp.int32)


def sample_timesteps_moving(
    rng: jax.Array,
    batch: int,
    schedule: NoiseSchedule,
    start_range: tuple[float, float],
    end_range: tuple[float, float],
    progress: jax.Array | float,
) -> jax.Array:
    """Training timesteps from a window that slides from `start_range` (progress 0) to `end_range`
    (progress >= 1), both bounds linearly: a timestep curriculum. Works with a traced `progress`.

    Why: with a small decoder the background and colours are decided at high noise and shapes at
    mid noise (docs/miniworld.md, "Timesteps"); a window that starts high and slides down lets the
    encoder write the coarse words first and the finer ones after.
    """
    lo0, hi0 = timestep_bounds(schedule, start_range)
    lo1, hi1 = timestep_bounds(schedule, end_range)
    frac = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
    lo = jnp.round(lo0 + (lo1 - lo0) * frac).astype(jnp.int32)
    hi = jnp.maximum(jnp.round(hi0 + (hi1 - hi0) * frac).astype(jnp.int32), lo + 1)
    return jax.random.randint(rng, (batch,), lo, hi, dtype=jnp.int32)


def timestep_bounds(schedule: NoiseSchedule, fraction_range: tuple[float, float]) -> tuple[int, int]:
    """Integer [lo, hi) of a fraction range of the training timesteps; raises on an empty range."""
    lo_f, hi_f = (float(x) for x in fraction_range)
    if not 0.0 <= lo_f < hi_f <= 1.0:
        raise ValueError(f"timestep fraction range {fraction_range} must satisfy 0 <= lo < hi <= 1")
    T = schedule.num_train_timesteps
    lo, hi = int(round(lo_f * T)), int(round(hi_f * T))
    if hi <= lo:
        raise ValueError(f"timestep fraction range {fraction_range} holds no timestep of {T}")
    return lo, hi


def ddim_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> np.ndarray:
    """diffusers' DDIMScheduler.set_timesteps(num_inference_steps).timesteps, as int64 numpy."""
    n, T = num_inference_steps, schedule.num_train_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps={n} must be in [1, num_train_timesteps={T}]")
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if schedule.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64)
        return ts + schedule.steps_offset
    ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64)  # trailing
    return ts - 1


def ddim_prev_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> np.ndarray:
    """The 'previous' timestep of each DDIM step: t - T // n, as diffusers' step computes it.

    Note: for 'linspace' (and 'trailing' with T % n != 0) this is not the next entry of
    `ddim_timesteps`; we follow diffusers so that samples match it. Negative means 'final'.
    """
    T = schedule.num_train_timesteps
    return ddim_timesteps(schedule, num_inference_steps) - T // num_inference_steps


def ddim_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    x_t: jax.Array,
    eta: float | jax.Array = 0.0,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update x_t -> x_{t_prev}; returns (x_prev, predicted x_0). As DDIMScheduler.step.

    t, t_prev: int scalars or [B]; t_prev < 0 uses `final_alpha_cumprod`. x_0 is clipped to
    +-clip_sample_range when the schedule says clip_sample. With eta > 0, `noise` (standard normal,
    x_t's shape) is the variance noise; the result keeps x_t's dtype.
    """
    dtype = x_t.dtype
    x = x_t.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    ac = jnp.concatenate(
        [jnp.asarray(schedule.alphas_cumprod), jnp.asarray([schedule.final_alpha_cumprod],
                                                           jnp.float32)]
    )
    t_prev = jnp.asarray(t_prev)
    a_t = _coef(ac, t, x)
    a_prev = _coef(ac, jnp.where(t_prev >= 0, t_prev, ac.shape[0] - 1), x)
    x0, eps = predict_x0_and_eps(schedule, out, x, t)
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    variance = (b_prev / b_t) * (1 - a_t / a_prev)
    std = eta * variance**0.5
    x_prev = a_prev**0.5 * x0 + jnp.maximum(1 - a_prev - std**2, 0.0) ** 0.5 * eps  # >= 0: rounding at eta=1
    if noise is not None:
        x_prev = x_prev + std * noise.astype(jnp.float32)
    return x_prev.astype(dtype), x0.astype(dtype)


def guided_model_fn(batched_fn: ModelFn, guidance_scale: float | jax.Array) -> ModelFn:
    """Classifier-free guidance: out = uncond + scale * (cond - uncond), one batched model call.

    `batched_fn(x2, t2)` gets the batch twice, concatenated: its FIRST half must be evaluated
    unconditionally and its SECOND half conditionally (diffusers' StableDiffusionPipeline order),
    e.g. by a UNet closed over `concatenate([uncond_states, cond_states])`.
    """

    def fn(x: jax.Array, t: jax.Array) -> jax.Array:
        out = batched_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
        uncond, cond = jnp.split(out, 2)
        return uncond + guidance_scale * (cond - uncond)

    return fn


def ddim_sample(
    model_fn: ModelFn,
    x_T: jax.Array,
    schedule: NoiseSchedule,
    num_inference_steps: int,
    eta: float | jax.Array = 0.0,
    rng: jax.Array | None = None,
    guidance_scale: float | jax.Array | None = None,
) -> jax.Array:
    """DDIM from x_T to x_0 with diffusers' timesteps, as one `lax.fori_loop`.

    `model_fn(x, t)` gets x [B, ...] and t int32 [B] and returns the model output (of the schedule's
    prediction_type). With `guidance_scale`, model_fn is wrapped by `guided_model_fn` (see there
    for the batch order it must follow). With eta != 0, step i's variance noise is
    `jax.random.normal(jax.random.fold_in(rng, i), x_T.shape, x_T.dtype)`.

    Why one loop: the compiled program holds the model once, whatever the step count, and the
    whole sampler is differentiable and jittable. Under the caller's jit, model params closed over
    by model_fn are traced arguments; called eagerly, the loop still runs as one XLA while op.
    """
    if guidance_scale is not None:
        model_fn = guided_model_fn(model_fn, guidance_scale)
    stochastic = not (isinstance(eta, (int, float)) and eta == 0)
    if stochastic and rng is None:
        raise ValueError("ddim_sample with eta != 0 needs rng")
    ts = jnp.asarray(ddim_timesteps(schedule, num_inference_steps), jnp.int32)
    prev = jnp.asarray(ddim_prev_timesteps(schedule, num_inference_steps), jnp.int32)
    batch = x_T.shape[0]

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t = jnp.full((batch,), ts[i], jnp.int32)
        out = model_fn(x, t)
        noise = None
        if stochastic:
            noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
        x, _ = ddim_step(schedule, out, t, jnp.full((batch,), prev[i], jnp.int32), x, eta, noise)
        return x

    return jax.lax.fori_loop(0, num_inference_steps, body, x_T)
