"""Mesh, sharding rules, born-sharded state and multi-host helpers on 8 fake CPU devices.

The central check: a toy attention/MLP/vocab-head train step gives the same losses and parameters
on one device and on meshes (data=8), (data=4, fsdp=2), (data=2, tensor=4).
"""

import logging
import os
import socket
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dediffusion_jax.parallel import mesh as mesh_lib
from dediffusion_jax.parallel import multihost
from dediffusion_jax.parallel import sharding as sh
from dediffusion_jax.train import optimizer as opt_lib

# ----------------------------------------------------------------------------------------- mesh


def test_make_mesh_auto_fills_and_orders_axes():
    mesh = mesh_lib.make_mesh({"data": -1})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    mesh = mesh_lib.make_mesh([("tensor", 2), ("fsdp", -1)])  # given order does not matter
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    mesh = mesh_lib.make_mesh({"data": -1}, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("axes, message", [
    ({"data": 3, "fsdp": -1}, "multiply to 3, which does not divide the device count 8"),
    ({"data": 2, "fsdp": 2}, "multiply to 4 but there are 8 devices"),
    ({"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
    ({"model": 8}, "unknown mesh axis 'model'"),
    ({"data": 0, "fsdp": -1}, "has size 0"),
])
def test_make_mesh_errors_name_the_numbers(axes, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.make_mesh(axes)


def test_batch_and_replicated_shardings():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = jax.device_put(np.arange(8 * 3, dtype=np.float32).reshape(8, 3), mesh_lib.batch_sharding(mesh))
    assert x.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}  # 4 batch shards x 2 replicas
    r = jax.device_put(np.ones(3), mesh_lib.replicated(mesh))
    assert r.sharding.is_fully_replicated


# ------------------------------------------------------------------------------- rule tables


def test_regex_table_first_match_and_non_dividing_fallback(caplog):
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
    table = [(r".*/kernel", P("fsdp", None)), (r".*", P())]
    tree = {"a": {"kernel": np.zeros((6, 16))}, "b": {"kernel": np.zeros((8, 3))},
            "bias": np.zeros(6)}
    with caplog.at_level(logging.DEBUG, logger="dediffusion_jax.parallel.sharding"):
        specs = sh.tree_specs(tree, mesh, table)
    assert specs == {"a": {"kernel": P()}, "b": {"kernel": P("fsdp")}, "bias": P()}
    assert "a/kernel: dim 0 (size 6) not divisible by ('fsdp',) (size 4)" in caplog.text
    shardings = sh.tree_shardings(tree, mesh, table)
    assert shardings["b"]["kernel"] == NamedSharding(mesh, P("fsdp"))


def test_unmatched_param_is_an_error_only_without_catch_all():
    mesh = mesh_lib.make_mesh({"data": -1})
    tree = {"dense": {"kernel": np.zeros((4, 4)), "bias": np.zeros(4)}}
    with pytest.raises(ValueError, match="no sharding rule matches 'dense/bias'"):
        sh.tree_specs(tree, mesh, [(r".*/kernel", P("fsdp"))])
    assert sh.tree_specs(tree, mesh, [(r".*/kernel", P("fsdp")), (r".*", P())])["dense"]["bias"] == P()


def test_spec_longer_than_rank_tries_next_rule_and_logical_axes_map_to_mesh():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    table = [(r".*kernel", sh.Logical("embed", "heads", "kv")), (r".*", sh.Logical("mlp"))]
    assert sh.spec_for("q/kernel", (8, 4, 2), mesh, table) == P("fsdp", "tensor")
    assert sh.spec_for("v_row/q/kernel", (8,), mesh, table) == P("tensor")  # rank 1: next rule
    with pytest.raises(ValueError, match="logical axis 'embd' has no rule"):
        sh.spec_for("x", (8,), mesh, [(r".*", sh.Logical("embd"))])
    # Configurable logical rules: put the vocabulary on fsdp instead of tensor.
    rules = dict(sh.DEFAULT_LOGICAL_RULES) | {"vocab": "fsdp"}
    assert sh.logical_to_mesh_spec(("embed", "vocab"), tuple(rules.items())) == P("fsdp", "fsdp")
    # ... and a mesh axis used twice is dropped from the later dim.
    assert sh.fit_spec(P("fsdp", "fsdp"), (8, 8), mesh) == P("fsdp")


def test_frozen_tree_sharding_keeps_values_bit_identical():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
    rng = np.random.default_rng(0)
    frozen = {"unet": {"conv_in": {"kernel": rng.normal(size=(3, 3, 4, 32)).astype(np.float32),
                                   "bias": rng.normal(size=32).astype(np.float32)}},
              "text": {"token_embedding": {"embedding": rng.normal(size=(102, 8)).astype(np.float32)}}}
    for table, expect_kernel in [(sh.FROZEN_REPLICATED, P()),
                                 (sh.frozen_rules(fsdp=True, min_size=256), P(None, None, None, "fsdp"))]:
        placed = jax.device_put(frozen, sh.tree_shardings(frozen, mesh, table))
        assert placed["unet"]["conv_in"]["kernel"].sharding.spec == expect_kernel
        assert placed["unet"]["conv_in"]["bias"].sharding.spec == P()  # below min_size
        for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(placed)):
            np.testing.assert_array_equal(a, np.asarray(b))
    # 102 x 8 embedding: the largest dim (102) does not divide 4, the next one (8) does.
    assert placed["text"]["token_embedding"]["embedding"].sharding.spec == P(None, "fsdp")


# ------------------------------------------------------------------ toy model and train step

D, HEADS, MLP, VOCAB, TOKENS, BATCH = 16, 4, 32, 24, 8, 16


class ToyEncoder(nn.Module):
    """Attention + MLP + vocabulary head with the parameter names of the real encoder."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="embed")(x)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (TOKENS, D))
        y = nn.LayerNorm(name="ln_attn")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(y, y)
        y = nn.LayerNorm(name="ln_mlp")(x)
        x = x + nn.Dense(D, name="mlp_fc2")(nn.gelu(nn.Dense(MLP, name="mlp_fc1")(y)))
        logits = VocabHead(name="vocab_head")(x)
        return logits


class VocabHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(VOCAB, name="dense")(x)


def _tx():
    config = opt_lib.default_config()
    config.optimizer.adafactor_min_dim_to_factor = 8  # factored statistics get sharded too
    config.lr.update(schedule="constant", peak=1e-2, warmup_steps=0)
    return opt_lib.make_optimizer(config)


def _init_state(rng):
    params = ToyEncoder().init(rng, jnp.zeros((1, TOKENS, 4)))["params"]
    return {"params": params, "opt_state": _tx().init(params)}


def _train_step(state, batch):
    def loss_fn(params):
        logits = ToyEncoder().apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = _tx().update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss


def _batches(n=3):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(BATCH, TOKENS, 4)).astype(np.float32),
             "y": rng.integers(0, VOCAB, size=(BATCH, TOKENS)).astype(np.int32)} for _ in range(n)]


@pytest.fixture(scope="module")
def single_device_run():
    dev = jax.devices()[0]
    state = jax.device_put(jax.jit(_init_state)(jax.random.key(0)), dev)
    step = jax.jit(_train_step, donate_argnums=(0,))
    losses = []
    for batch in _batches():
        state, loss = step(state, jax.device_put(batch, dev))
        losses.append(float(loss))
    return losses, jax.tree.map(np.asarray, state["params"])


def _sharded_state(mesh):
    """Born sharded, as the train loop does it: eval_shape -> shardings -> jit(init, out_shardings)."""
    shardings = sh.tree_shardings(jax.eval_shape(_init_state, jax.random.key(0)), mesh, sh.ENCODER_RULES)
    return jax.jit(_init_state, out_shardings=shardings)(jax.random.key(0))


def _shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


@pytest.mark.parametrize("axes", [{"data": 8}, {"data": 4, "fsdp": 2}, {"data": 2, "tensor": 4}],
                         ids=["data8", "data4-fsdp2", "data2-tensor4"])
def test_sharded_train_step_matches_single_device(axes, single_device_run):
    ref_losses, ref_params = single_device_run
    mesh = mesh_lib.make_mesh(axes)
    state = _sharded_state(mesh)
    state_sh = _shardings_of(state)
    batch_sh = mesh_lib.batch_sharding(mesh)
    step = jax.jit(_train_step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, mesh_lib.replicated(mesh)), donate_argnums=(0,))
    losses = []
    for batch in _batches():
        global_batch = multihost.host_local_batch_to_global(mesh, batch)
        state, loss = step(state, global_batch)
        losses.append(float(loss))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert _shardings_of(state) == state_sh  # the step keeps the layout (donation-friendly)
    for (path, ref), got in zip(jax.tree_util.tree_leaves_with_path(ref_params),
                                jax.tree.leaves(state["params"])):
        if sh.path_str(path) == "attn/key/bias":
            # Its exact gradient is 0 (softmax ignores a shift shared by all keys): the computed
            # one is rounding noise, which Adafactor's normalisation blows up to lr-sized steps.
            continue
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-6,
                                   err_msg=sh.path_str(path))


def test_params_born_sharded_have_expected_specs():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state = _sharded_state(mesh)
    p = jax.tree.map(lambda x: x.sharding.spec, state["params"])
    assert p["attn"]["query"]["kernel"] == P("fsdp", "tensor")  # [D, H, Dh]
    assert p["attn"]["query"]["bias"] == P("tensor")  # [H, Dh]
    assert p["attn"]["out"]["kernel"] == P("tensor", None, "fsdp")  # [H, Dh, D]
    assert p["mlp_fc1"]["kernel"] == P("fsdp", "tensor") and p["mlp_fc1"]["bias"] == P("tensor")
    assert p["mlp_fc2"]["kernel"] == P("tensor", "fsdp") and p["mlp_fc2"]["bias"] == P()
    assert p["vocab_head"]["dense"]["kernel"] == P("fsdp", "tensor")
    assert p["vocab_head"]["dense"]["bias"] == P("tensor")
    assert p["embed"]["kernel"] == P(None, "fsdp")  # [4, 16]: FSDP over the largest dim
    assert p["pos_embedding"] == P(None, "fsdp")
    assert p["ln_mlp"]["scale"] == P()
    # Optimizer state follows its parameter (Adafactor momentum) or is replicated (counts).
    mu = optax.tree_utils.tree_get(state["opt_state"], "ema")
    assert mu["mlp_fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    # Each device holds 1/8 of the fc1 kernel: born sharded, never whole on one device.
    kernel = state["params"]["mlp_fc1"]["kernel"]
    assert {s.data.shape for s in kernel.addressable_shards} == {(D // 2, MLP // 2)}


def test_flax_partitioning_annotations_override_the_table():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    class Annotated(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")),
                           (8, 4))
            return x @ w

    abstract = jax.eval_shape(lambda: Annotated().init(jax.random.key(0), jnp.ones((1, 8))))
    shardings = sh.tree_shardings(abstract, mesh, [(".*", P())])  # the table alone would replicate
    assert shardings["params"]["w"].spec == P("fsdp", "tensor")


# ------------------------------------------------------------------------------- multi-host


def test_host_local_batch_to_global_single_process_equals_device_put():
    mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2})
    batch = _batches(1)[0]
    got = multihost.host_local_batch_to_global(mesh, batch)
    want = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
    for key in batch:
        assert got[key].shape == batch[key].shape and got[key].sharding == want[key].sharding
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_initialize_distributed_is_noop_for_one_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert multihost.initialize_distributed() is False
    assert multihost.initialize_distributed("127.0.0.1:1", num_processes=1, process_id=0) is False
    multihost.sync_global_devices("noop")  # no barrier needed, must not hang
    assert jax.process_count() == 1


_WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import jax, jax.numpy as jnp
    from dediffusion_jax.parallel import mesh as mesh_lib, multihost
    port, pid, result_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    assert multihost.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    mesh = mesh_lib.make_mesh({"data": -1})  # 2 processes x 4 devices
    full = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    local = full[pid * 8:(pid + 1) * 8]  # this host's 8 rows
    batch = multihost.host_local_batch_to_global(mesh, {"x": local})
    total = jax.jit(lambda b: (b["x"].sum(), b["x"][:, 0]),
                    out_shardings=mesh_lib.replicated(mesh))(batch)
    multihost.sync_global_devices("done")
    with open(result_file, "w") as f:  # a file, not stdout: gloo's C++ logging interleaves with it
        print(jax.process_count(), jax.device_count(), batch["x"].shape,
              float(total[0]), np.asarray(total[1]).tolist() == full[:, 0].tolist(), file=f)
    jax.distributed.shutdown()
""")


@pytest.mark.multiprocess
def test_two_processes_assemble_one_global_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    results = [tmp_path / f"result_{i}.txt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), str(results[i])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:  # seconds when the machine is idle; generous for a loaded CI machine
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    expected_sum = float(np.arange(48).sum())
    for p, out, result in zip(procs, outs, results):
        assert p.returncode == 0, out
        assert result.read_text() == f"2 8 (16, 3) {expected_sum} True\n", out
