"""The fused vocabulary head's chunking (issue 21): any chunking gives the same values and gradients, the
default rule keeps the paper's shape bounded and runs small problems in one chunk, each device loops over
its own rows, and the counted FLOPs do not move with the chunk size."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dediffusion_jax import config as config_lib, loop_flops
from dediffusion_jax.models import quantizer as q

B, N, C, V, D = 4, 6, 16, 97, 8


def _setup():
    keys = jax.random.split(jax.random.key(0), 5)
    features = jax.random.normal(keys[0], (B, N, C))
    kernel = jax.random.normal(keys[1], (C, V)) * 0.3
    bias = jax.random.normal(keys[2], (V,)) * 0.1
    table = jax.random.normal(keys[3], (V, D))
    target = jax.random.normal(keys[4], (B, N, D))
    mask = np.zeros(V, bool)
    mask[[0, 5, V - 1]] = True
    return features, kernel, bias, table, target, mask


def _value_and_grads(embed, hard):
    features, kernel, bias, table, target, mask = _setup()

    def loss(x, k, b, t, e):
        return jnp.mean((embed(x, k, b, mask, t, hard, e) - target) ** 2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    return grad(features, kernel, bias, jnp.float32(0.7), table)


@pytest.mark.parametrize("hard", [True, False])
def test_every_chunking_gives_the_reference_values_and_gradients(hard):
    rng = jax.random.key(3)
    reference = _value_and_grads(lambda x, k, b, m, t, h, e: q.soft_token_embeddings(
        q.apply_mask(x @ k + b, m), rng, t, h, e), hard)
    chunkings = [dict(rows_per_chunk=1), dict(rows_per_chunk=5), dict(rows_per_chunk=B * N),  # one chunk
                 dict(), dict(chunk_budget_mb=1e-3),  # auto: 2 chunks of 12 rows; 1 kB: 1 row a chunk
                 dict(rows_per_chunk=4, batch_shards=2), dict(rows_per_chunk=7, batch_shards=4),
                 dict(batch_shards=3), dict(rows_per_chunk=4, batch_shards=5)]  # not divisors of 4: 1
    for kwargs in chunkings:
        value, grads = _value_and_grads(lambda x, k, b, m, t, h, e, kw=kwargs: q.fused_soft_token_embeddings(
            x, k, b, m, rng, t, h, e, embedding_grad=True, **kw), hard)
        np.testing.assert_allclose(value, reference[0], rtol=1e-5, atol=1e-6, err_msg=str(kwargs))
        for g, r in zip(grads, reference[1]):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=str(kwargs))


def test_default_rule_bounds_the_papers_vocabulary_and_always_loops():
    paper, world = 49_408, 606
    cap = int(q.CHUNK_BUDGET_MB * 1e6 // (q.ROW_BUFFERS * paper * 4))  # 80 rows
    assert cap == 80
    assert q.auto_rows_per_chunk(300, paper) == 75  # 4 images x 75 queries: 4 equal chunks
    assert q.auto_rows_per_chunk(2400, paper) == 80  # 32 images: 30 chunks
    assert q.auto_rows_per_chunk(75, paper) == 38  # 2 chunks, 1 padded row
    assert q.auto_rows_per_chunk(384, world) == 192  # the world's 32 x 12 rows: 2 chunks
    for vocab in (paper, world):
        for rows in (2, 21, 75, 300, 384, 2400, 10_000):
            chunk = q.auto_rows_per_chunk(rows, vocab)
            assert -(-rows // chunk) >= 2  # a loop, never one pass
            assert chunk <= max(1, q.CHUNK_BUDGET_MB * 1e6 // (q.ROW_BUFFERS * vocab * 4))  # the budget
            assert chunk >= min(rows // 2, cap // 2)  # not needlessly small
    assert q.auto_rows_per_chunk(300, paper, budget_mb=256) == 150
    quantizer = config_lib.base_config().quantizer  # the default: this rule, this budget
    assert quantizer.rows_per_chunk == 0 and quantizer.chunk_budget_mb == q.CHUNK_BUDGET_MB
    assert q.auto_rows_per_chunk(1, paper) == 1 and q.auto_rows_per_chunk(5, paper, budget_mb=0) == 1


def _flops(rows_per_chunk, shards=1, mesh=None):
    features, kernel, bias, table, target, mask = _setup()
    features = jnp.tile(features, (2, 4, 1))  # 8 x 24 = 192 rows

    def loss(x, k, b):
        out = q.fused_soft_token_embeddings(x, k, b, mask, jax.random.key(1), 1.0, True, table,
                                            rows_per_chunk=rows_per_chunk, batch_shards=shards)
        return jnp.sum(out ** 2)

    shardings = {} if mesh is None else dict(in_shardings=(NamedSharding(mesh, P("data")), None, None))
    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), **shardings).trace(features, kernel, bias)
    compiled = traced.lower().compile()
    xla = loop_flops._flops(compiled.cost_analysis())
    return xla, loop_flops.corrected_flops(traced.jaxpr, xla), compiled.as_text()


def test_counted_flops_do_not_change_with_rows_per_chunk():
    one_xla, one, _ = _flops(192)
    assert one == one_xla  # no loop: nothing to add
    for chunk in (8, 32, 64):
        xla, counted, _ = _flops(chunk)
        assert xla < 0.6 * one  # XLA alone counts one chunk of the loop
        # Within 6%: a loop does a little real work per iteration (its carries' additions), which
        # weighs most at this tiny width (16); at the paper's width the figures agree within 0.2%.
        assert counted == pytest.approx(one, rel=0.06), chunk


def test_each_device_loops_over_its_own_rows():
    """batch_shards = the mesh's batch split: no all-gather of the features, each device's loop runs
    its own rows' chunks, and the counted FLOPs per device are about half the single device's."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    _, single, _ = _flops(16)
    _, replicated, text = _flops(16, shards=1, mesh=mesh)
    assert "all-gather" in text  # the old layout: every device runs every chunk of the global batch
    assert replicated == pytest.approx(single, rel=0.05)
    _, per_device, text = _flops(16, shards=2, mesh=mesh)
    assert "all-gather" not in text
    trips = {int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', text)}
    assert 96 // 16 in trips and 192 // 16 not in trips
    assert per_device == pytest.approx(single / 2, rel=0.05)


def test_loop_flops_counts_a_scan_body_once_per_iteration():
    def f(x):
        return jax.lax.scan(lambda c, r: (c + jnp.sum(jnp.tanh(r @ r.T)), None), 0.0, x)[0]

    assert not loop_flops.xla_counts_loop_trips(jax.default_backend())  # XLA alone: the body once
    xla, counted = {}, {}
    for n in (1, 8):
        traced = jax.jit(f).trace(jax.ShapeDtypeStruct((n, 16, 32), jnp.float32))
        xla[n] = loop_flops._flops(traced.lower().compile().cost_analysis())
        counted[n] = loop_flops.corrected_flops(traced.jaxpr, xla[n])
    assert xla[8] < 2 * xla[1]
    assert counted[8] == pytest.approx(8 * counted[1], rel=0.02)


def test_bench_script_runs_at_a_tiny_shape(capsys):
    from bench import vocab_head

    rows = vocab_head.main(["--images", "2", "--queries", "8", "--width", "16", "--vocab", "50", "--dim", "8",
                            "--chunks", "4,auto,all", "--repeats", "1"])
    assert [r["loop_trips"] for r in rows] == [4, 2, 1]
    assert all(r["counted_GFLOP"] > r["xla_GFLOP"] for r in rows[:2])  # loops: bodies counted again
    assert rows[2]["counted_GFLOP"] == rows[2]["xla_GFLOP"]
    assert "| auto = 8 | 2 |" in capsys.readouterr().out
