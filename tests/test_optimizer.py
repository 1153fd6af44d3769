"""Optimizer and learning-rate schedule: the paper's numbers, the weight-decay mask, convergence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dediffusion_jax.train import optimizer as opt_lib


def _config(**overrides):
    c = opt_lib.default_config()
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (c[section] if section else c)[field] = value
    return c


def test_paper_schedule_exact_values():
    sched = opt_lib.make_lr_schedule(opt_lib.default_config())  # 3e-4 -> 3e-6, 10K warmup, 500K
    np.testing.assert_allclose(float(sched(0)), 0.0, atol=0)
    np.testing.assert_allclose(float(sched(5_000)), 1.5e-4, rtol=1e-6)  # halfway up the ramp
    np.testing.assert_allclose(float(sched(10_000)), 3e-4, rtol=1e-6)  # end of warmup: peak
    # Cosine runs over the remaining 490K steps: its midpoint is halfway between peak and end.
    np.testing.assert_allclose(float(sched(255_000)), (3e-4 + 3e-6) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(sched(500_000)), 3e-6, rtol=1e-5)
    np.testing.assert_allclose(float(sched(600_000)), 3e-6, rtol=1e-5)  # stays at the end value


def test_constant_schedule_with_and_without_warmup():
    sched = opt_lib.make_lr_schedule(_config(**{"lr.schedule": "constant", "lr.warmup_steps": 0}))
    assert float(sched(0)) == pytest.approx(3e-4) and float(sched(10**6)) == pytest.approx(3e-4)
    sched = opt_lib.make_lr_schedule(_config(**{"lr.schedule": "constant", "lr.warmup_steps": 10}))
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(1.5e-4)
    assert float(sched(10)) == pytest.approx(3e-4) and float(sched(10**6)) == pytest.approx(3e-4)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="unknown optimizer.name 'sgdd'"):
        opt_lib.make_optimizer(_config(**{"optimizer.name": "sgdd"}))
    with pytest.raises(ValueError, match="total_steps"):
        opt_lib.make_lr_schedule(_config(total_steps=100))


PARAMS = {
    "params": {
        "embedding": jnp.ones((10, 4)),
        "encoderblock_0": {
            "LayerNorm_0": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
            "MlpBlock_0": {"Dense_0": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)}},
        },
        "pooler": {"queries": jnp.ones((3, 4))},
        "vocab_head": {"kernel": jnp.ones((4, 10))},
    }
}


def test_weight_decay_mask_is_kernels_only():
    mask = opt_lib.weight_decay_mask(PARAMS)
    p = mask["params"]
    assert p["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"] is True
    assert p["vocab_head"]["kernel"] is True
    assert p["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["bias"] is False
    assert p["encoderblock_0"]["LayerNorm_0"]["scale"] is False
    assert p["encoderblock_0"]["LayerNorm_0"]["bias"] is False
    assert p["embedding"] is False
    assert p["pooler"]["queries"] is False


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_decoupled_weight_decay_is_lr_times_wd_on_kernels_only(name):
    # Zero gradients: the whole update is the decoupled decay, -lr * wd * param, on kernels only.
    config = _config(**{"optimizer.name": name, "lr.schedule": "constant", "lr.warmup_steps": 0})
    tx = opt_lib.make_optimizer(config)
    state = tx.init(PARAMS)
    grads = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = jax.jit(tx.update)(grads, state, PARAMS)
    mask = opt_lib.weight_decay_mask(PARAMS)
    for upd, decayed in zip(jax.tree.leaves(updates), jax.tree.leaves(mask)):
        expected = -3e-4 * 0.01 if decayed else 0.0
        np.testing.assert_allclose(np.asarray(upd), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_optimizer_reduces_quadratic_loss(name):
    # A [64, 48] kernel is factored by Adafactor (min dim 32), the bias is not: both paths run.
    config = _config(**{"optimizer.name": name, "lr.schedule": "constant", "lr.peak": 0.05,
                        "lr.warmup_steps": 0})
    tx = opt_lib.make_optimizer(config)
    k1, k2 = jax.random.split(jax.random.key(0))
    target = {"dense": {"kernel": jax.random.normal(k1, (64, 48)),
                        "bias": jax.random.normal(k2, (48,))}}
    params = jax.tree.map(jnp.zeros_like, target)

    def loss_fn(p):
        return sum(jnp.mean((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state = tx.init(params)
    if name == "adafactor":
        v_row = state[1][0].v_row["dense"]  # (clip, adafactor direction, wd, lr) -> factored stats
        assert v_row["kernel"].ndim == 1 and v_row["bias"].shape == (1,)  # factored vs not
    first = float(loss_fn(params))
    for _ in range(100):
        params, state, _ = step(params, state)
    last = float(loss_fn(params))
    assert last < 0.05 * first, (first, last)


def test_adafactor_b2_is_capped_schedule():
    # b2_t = min(0.999, 1 - (t+1)^-0.8): Adafactor's bias-correcting ramp, capped at the paper's 0.999.
    tx = opt_lib.scale_by_adafactor(b1=0.0, b2_cap=0.999, min_dim_size_to_factor=1000)
    g = {"w": jnp.array([2.0])}
    s = tx.init(g)
    _, s = tx.update(g, s, g)
    # Step 0: b2 = 1 - 1 = 0, so v = g^2 exactly (no bias towards the zero init).
    np.testing.assert_allclose(np.asarray(s[0].v["w"]), [4.0], rtol=1e-6)
    s = s[0]._replace(count=jnp.asarray(10**6, jnp.int32)), *s[1:]
    _, s2 = tx.update({"w": jnp.array([0.0])}, tuple(s), g)
    np.testing.assert_allclose(np.asarray(s2[0].v["w"]), [4.0 * 0.999], rtol=1e-6)


def test_clipping_applies_to_the_raw_gradient_and_bounds_spikes():
    base = {"optimizer.name": "adamw", "lr.schedule": "constant", "lr.warmup_steps": 0,
            "optimizer.weight_decay": 0.0}
    clipped = opt_lib.make_optimizer(_config(**base, **{"optimizer.grad_clip_norm": 1.0}))
    unclipped = opt_lib.make_optimizer(_config(**base, **{"optimizer.grad_clip_norm": 0.0}))
    params = {"w": jnp.zeros(4)}
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=4).astype(np.float32) * 0.3 for _ in range(5)]
    grads.append(np.full(4, 1e4, np.float32))  # a spike
    sc, su, sref = clipped.init(params), unclipped.init(params), unclipped.init(params)
    for g in grads:
        uc, sc = clipped.update({"w": jnp.asarray(g)}, sc, params)
        # Exactly "clip the gradient, then run the unclipped optimizer".
        g_clip = g * min(1.0, 1.0 / float(np.linalg.norm(g)))
        ur, sref = unclipped.update({"w": jnp.asarray(g_clip)}, sref, params)
        np.testing.assert_allclose(np.asarray(uc["w"]), np.asarray(ur["w"]), rtol=1e-5)
        uu, su = unclipped.update({"w": jnp.asarray(g)}, su, params)
    # The spike cannot pollute Adam's second moment (which would shrink the following steps):
    # with clipping every nu entry stays below clip^2 = 1; without it nu jumps by 1e-3 * 1e8.
    nu_clipped, nu_unclipped = (
        np.asarray(optax.tree_utils.tree_get(s, "nu")["w"]) for s in (sc, su))
    assert np.max(nu_clipped) <= 1.0 and np.min(nu_unclipped) > 1e4
    assert np.all(np.abs(np.asarray(uc["w"])) <= 3e-4 * 1.01)  # and the step itself stays <= ~lr
