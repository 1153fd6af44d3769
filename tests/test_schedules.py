"""Noise schedules, targets and DDIM sampling agree with diffusers' DDIM/DDPM schedulers."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dediffusion_jax.t2i import schedules as S

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
BETAS = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
}
PREDICTIONS = ("epsilon", "v_prediction", "sample")
# Stable Diffusion 1.x's scheduler_config.json (a PNDMScheduler config; extra keys are ignored).
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def _t(x):
    return torch.from_numpy(np.array(x))


def _data(shape=(4, 3, 5, 5), seed=0):
    rng = np.random.RandomState(seed)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_from_dict_reads_a_stable_diffusion_config_and_round_trips():
    s = S.NoiseSchedule.from_dict(SD15)
    assert (s.beta_schedule, s.steps_offset, s.set_alpha_to_one, s.clip_sample) == (
        "scaled_linear", 1, False, False)
    assert s.prediction_type == "epsilon" and s.timestep_spacing == "leading"
    assert S.NoiseSchedule.from_dict(s.to_dict()) == s
    assert hash(s) == hash(S.NoiseSchedule.from_dict(SD15))  # usable as a static jit argument
    assert s.alphas_cumprod.dtype == np.float32 and s.alphas_cumprod.shape == (1000,)


@pytest.mark.parametrize(
    "key, value",
    [
        ("beta_schedule", "sigmoid"),
        ("prediction_type", "x0"),
        ("timestep_spacing", "karras"),
        ("thresholding", True),
        ("num_train_timesteps", 0),
        ("trained_betas", [0.1, 0.2]),
        ("clip_sample", "yes"),
    ],
)
def test_from_dict_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        S.NoiseSchedule.from_dict({**SD15, key: value})


@pytest.mark.parity
def test_to_dict_is_accepted_by_diffusers_ddim():
    s = S.NoiseSchedule.from_dict({**SD15, "prediction_type": "v_prediction",
                                   "timestep_spacing": "trailing"})
    ref = diffusers.DDIMScheduler.from_config(s.to_dict())
    for key, value in s.to_dict().items():
        if not key.startswith("_"):
            assert ref.config[key] == value, key
    np.testing.assert_array_equal(ref.alphas_cumprod.numpy(), s.alphas_cumprod)


# ---------------------------------------------------------------------------------------------
# Schedules and training targets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("name", [*BETAS, "zero_snr", "trained_betas"])
def test_alphas_cumprod_match_diffusers(name):
    if name == "zero_snr":
        cfg = {**BETAS["scaled_linear"], "rescale_betas_zero_snr": True}
    elif name == "trained_betas":
        cfg = {"num_train_timesteps": 50, "trained_betas": np.linspace(1e-3, 0.2, 50).tolist()}
    else:
        cfg = BETAS[name]
    ref = diffusers.DDIMScheduler(**cfg)
    s = S.NoiseSchedule.from_dict(cfg)
    if name == "zero_snr":  # torch's float32 sqrt is not correctly rounded: ~1 ulp apart
        np.testing.assert_allclose(s.alphas_cumprod, ref.alphas_cumprod.numpy(), atol=1e-6)
        assert s.alphas_cumprod[-1] == 0.0
    else:  # same float32 arithmetic: bit-identical
        np.testing.assert_array_equal(s.alphas_cumprod, ref.alphas_cumprod.numpy())


@pytest.mark.parity
@pytest.mark.parametrize("name", BETAS)
def test_add_noise_and_velocity_match_diffusers(name):
    ref = diffusers.DDPMScheduler(**BETAS[name])
    s = S.NoiseSchedule.from_dict(BETAS[name])
    x0, noise = _data()
    t = np.array([0, 17, 500, 999])
    expected_xt = ref.add_noise(_t(x0), _t(noise), _t(t)).numpy()
    expected_v = ref.get_velocity(_t(x0), _t(noise), _t(t)).numpy()
    xt = S.add_noise(s, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    v = S.velocity(s, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert np.abs(np.asarray(xt) - expected_xt).max() <= 1e-6
    assert np.abs(np.asarray(v) - expected_v).max() <= 1e-6


@pytest.mark.parity
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("name", BETAS)
def test_training_target_and_its_inverse(name, prediction_type):
    cfg = {**BETAS[name], "prediction_type": prediction_type}
    ref = diffusers.DDPMScheduler(**cfg)
    s = S.NoiseSchedule.from_dict(cfg)
    x0, noise = _data()
    t = jnp.asarray([1, 250, 600, 998])
    target = S.training_target(s, x0, noise, t)
    expected = {
        "epsilon": noise,
        "v_prediction": ref.get_velocity(_t(x0), _t(noise), _t(np.asarray(t))).numpy(),
        "sample": x0,
    }[prediction_type]
    assert np.abs(np.asarray(target) - expected).max() <= 1e-6
    # A perfect model output recovers x_0 and eps from x_t.
    x0_hat, eps_hat = S.predict_x0_and_eps(s, target, S.add_noise(s, x0, noise, t), t)
    np.testing.assert_allclose(np.asarray(x0_hat)[1:3], x0[1:3], atol=1e-3)
    np.testing.assert_allclose(np.asarray(eps_hat)[1:3], noise[1:3], atol=1e-3)


def test_sample_timesteps_are_uniform_ints_in_range():
    s = S.NoiseSchedule(num_train_timesteps=10)
    t = S.sample_timesteps(jax.random.PRNGKey(0), 5000, s)
    assert t.shape == (5000,) and t.dtype == jnp.int32
    counts = np.bincount(np.asarray(t), minlength=10)
    assert counts.min() > 400 and np.asarray(t).max() == 9 and np.asarray(t).min() == 0


def test_sample_timesteps_can_be_restricted_to_a_fraction_of_the_range():
    s = S.NoiseSchedule(num_train_timesteps=1000)
    t = np.asarray(S.sample_timesteps(jax.random.PRNGKey(0), 5000, s, (0.5, 1.0)))
    assert t.min() == 500 and t.max() == 999
    for empty_or_outside in [(0.5, 0.5), (-0.1, 1.0), (0.2, 1.1), (0.9996, 1.0)]:
        with pytest.raises(ValueError, match="timestep fraction range"):
            S.timestep_bounds(s, empty_or_outside)


def test_a_moving_timestep_window_slides_from_the_start_range_to_the_end_range():
    s = S.NoiseSchedule(num_train_timesteps=1000)
    key = jax.random.PRNGKey(0)

    def window(progress):
        t = np.asarray(S.sample_timesteps_moving(key, 5000, s, (0.8, 1.0), (0.5, 0.9), progress))
        return t.min(), t.max()

    assert window(0.0) == (800, 999)
    assert window(0.5) == (650, 949)          # both bounds halfway
    assert window(1.0) == (500, 899) == window(3.0)  # clamped after the ramp
    # The same draws as the fixed range at progress 0, so a curriculum starts exactly where it says.
    np.testing.assert_array_equal(S.sample_timesteps_moving(key, 64, s, (0.8, 1.0), (0.5, 0.9), 0.0),
                                  S.sample_timesteps(key, 64, s, (0.8, 1.0)))
    # A traced progress (inside jit, as in the train step) gives the same window.
    traced = jax.jit(lambda p: S.sample_timesteps_moving(key, 5000, s, (0.8, 1.0), (0.5, 0.9), p))
    np.testing.assert_array_equal(traced(0.5), S.sample_timesteps_moving(key, 5000, s, (0.8, 1.0),
                                                                          (0.5, 0.9), 0.5))
    with pytest.raises(ValueError, match="timestep fraction range"):
        S.sample_timesteps_moving(key, 4, s, (0.8, 1.0), (0.9, 0.5), 0.0)


# ---------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
def test_ddim_timesteps_match_diffusers(spacing, steps_offset):
    cfg = {**SD15, "timestep_spacing": spacing, "steps_offset": steps_offset}
    s = S.NoiseSchedule.from_dict(cfg)
    for n in (1, 7, 10, 50, 999):
        ref = diffusers.DDIMScheduler.from_config(cfg)
        ref.set_timesteps(n)
        np.testing.assert_array_equal(S.ddim_timesteps(s, n), ref.timesteps.numpy(), err_msg=n)
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.ddim_timesteps(s, 1001)


@pytest.mark.parity
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("name", BETAS)
def test_single_ddim_steps_match_diffusers(name, prediction_type, eta):
    cfg = {**BETAS[name], "prediction_type": prediction_type, "clip_sample": name != "linear",
           "set_alpha_to_one": name == "squaredcos_cap_v2", "steps_offset": 1}
    ref = diffusers.DDIMScheduler(**cfg)
    ref.set_timesteps(20)
    s = S.NoiseSchedule.from_dict(cfg)
    prev = S.ddim_prev_timesteps(s, 20)
    x, out = _data(seed=1)
    noise = np.random.RandomState(2).normal(size=x.shape).astype(np.float32)
    worst = 0.0
    for i in (0, 7, 19):  # first, middle, and the last step (t_prev < 0: final alpha)
        t = int(ref.timesteps[i])
        r = ref.step(_t(out), t, _t(x), eta=eta,
                     variance_noise=_t(noise) if eta else None)
        x_prev, x0 = S.ddim_step(s, jnp.asarray(out), jnp.asarray(t), jnp.asarray(prev[i]),
                                 jnp.asarray(x), eta, jnp.asarray(noise) if eta else None)
        for ours, theirs in ((x_prev, r.prev_sample), (x0, r.pred_original_sample)):
            theirs = theirs.numpy()
            # x_0 from eps at t ~ 950 of a linear schedule is O(100): compare relative to scale
            scale = max(1.0, np.abs(theirs).max())
            worst = max(worst, np.abs(np.asarray(ours) - theirs).max() / scale)
    assert worst <= TOL, worst


def _toy_jax(a):
    def model_fn(x, t):
        return a * x + 0.3 * jnp.sin(t.astype(jnp.float32) / 100.0).reshape(-1, 1, 1, 1)
    return model_fn


def _toy_torch(a, x, t):
    return a * x + 0.3 * torch.sin(torch.as_tensor(t, dtype=torch.float32) / 100.0)


SAMPLING_CASES = {
    "sd15_eps": SD15,
    "vpred_cosine_trailing_clip": {**BETAS["squaredcos_cap_v2"], "prediction_type": "v_prediction",
                                   "timestep_spacing": "trailing", "clip_sample": True},
    "sample_linspace": {**BETAS["linear"], "prediction_type": "sample",
                        "timestep_spacing": "linspace", "clip_sample": False},
}


@pytest.mark.parity
@pytest.mark.parametrize("guidance_scale", [None, 7.5])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_whole_ddim_run_matches_diffusers(case, eta, guidance_scale):
    """10 steps from the same x_T with a toy denoiser written twice; guidance as SD does it."""
    cfg = SAMPLING_CASES[case]
    n, shape = 10, (2, 4, 4, 3)  # NHWC, any layout works: per-example coefficients broadcast
    x_T = np.random.RandomState(3).normal(size=shape).astype(np.float32)
    rng = jax.random.PRNGKey(4)
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(rng, i), shape)) for i in range(n)]

    ref = diffusers.DDIMScheduler.from_config(cfg)
    ref.set_timesteps(n)
    x = _t(x_T)
    for i, t in enumerate(ref.timesteps):
        if guidance_scale is None:
            out = _toy_torch(0.4, x, t)
        else:  # one batched call: first half unconditional, second conditional
            both = torch.cat([_toy_torch(0.1, x, t), _toy_torch(0.4, x, t)])
            uncond, cond = both.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        x = ref.step(out, t, x, eta=eta, variance_noise=_t(noises[i]) if eta else None).prev_sample

    s = S.NoiseSchedule.from_dict(cfg)
    if guidance_scale is None:
        model_fn = _toy_jax(0.4)
    else:
        def model_fn(x2, t2):  # the batch arrives doubled: [uncond half; cond half]
            half = x2.shape[0] // 2
            return jnp.concatenate([_toy_jax(0.1)(x2[:half], t2[:half]),
                                    _toy_jax(0.4)(x2[half:], t2[half:])])
    sample = jax.jit(
        lambda x_T, rng: S.ddim_sample(model_fn, x_T, s, n, eta=eta, rng=rng,
                                       guidance_scale=guidance_scale)
    )(jnp.asarray(x_T), rng)
    err = np.abs(np.asarray(sample) - x.numpy()).max()
    print(f"DDIM 10 steps {case} eta={eta} guidance={guidance_scale}: max abs err {err:.2e}")
    assert err <= TOL, err


def test_ddim_sample_is_one_loop_and_differentiable():
    s = S.NoiseSchedule.from_dict(SD15)
    model_fn = _toy_jax(0.4)
    jaxpr = jax.make_jaxpr(lambda x: S.ddim_sample(model_fn, x, s, 25))(jnp.ones((1, 2, 2, 1)))
    loops = [e.primitive.name for e in jaxpr.jaxpr.eqns if e.primitive.name in ("while", "scan")]
    assert loops == ["scan"]  # fori_loop with a static trip count is a scan (reverse-mode ok)
    assert "sin" not in {e.primitive.name for e in jaxpr.jaxpr.eqns}  # the model is inside
    grad = jax.grad(lambda x: S.ddim_sample(model_fn, x, s, 5).sum())(jnp.ones((1, 2, 2, 1)))
    assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).max() > 0
    with pytest.raises(ValueError, match="rng"):
        S.ddim_sample(model_fn, jnp.ones((1, 2, 2, 1)), s, 5, eta=1.0)
