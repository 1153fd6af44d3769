"""Quantizer: vocabulary mask, masked head, Gumbel-softmax, schedules, assembly, memory-lean embeddings."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dediffusion_jax.models import quantizer as q

WORDS = ("a", "red", "blue", "circle", "square", "on", "the", "left", "dog", "...", "!!", "café", "…", "€")


def write_tiny_clip_vocab(directory: Path, words=WORDS) -> Path:
    """A CLIP-style BPE vocabulary: 256 byte symbols, the same with '</w>', word merges, specials."""
    byte_syms = list(q._byte_decoder().keys())
    encode = {b: c for c, b in q._byte_decoder().items()}
    vocab: dict[str, int] = {}
    for s in byte_syms + [s + "</w>" for s in byte_syms]:
        vocab.setdefault(s, len(vocab))
    merges: list[str] = []
    for word in words:
        syms = [encode[b] for b in word.encode()]
        syms[-1] += "</w>"
        cur = syms[0]
        for nxt in syms[1:]:
            if f"{cur} {nxt}" not in merges:
                merges.append(f"{cur} {nxt}")
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(write_tiny_clip_vocab(tmp_path_factory.mktemp("tok")))


def test_exclusion_mask_specials_punctuation_and_extras(tokenizer):
    mask = q.vocabulary_exclusion_mask(tokenizer)
    ids = tokenizer.get_vocab()
    assert mask.dtype == np.bool_ and mask.shape == (len(tokenizer),)
    for token in ["<|startoftext|>", "<|endoftext|>", "!</w>", ",", "...</w>", "..", "!!</w>",
                  "âĢ¦</w>", "âĤ¬</w>"]:  # specials, ASCII punctuation, '…' (P), '€' (Sc)
        assert mask[ids[token]], token
    for token in ["a</w>", "red</w>", "cafÃ©</w>", "7</w>", "Ã"]:  # words, 'é', digits, a UTF-8 fragment
        assert not mask[ids[token]], token
    only_specials = q.vocabulary_exclusion_mask(tokenizer, exclude_punctuation=False)
    assert np.flatnonzero(only_specials).tolist() == sorted(tokenizer.all_special_ids)
    extra = q.vocabulary_exclusion_mask(tokenizer, False, ["dog</w>", ids["blue</w>"], "red square"])
    assert extra[[ids["dog</w>"], ids["blue</w>"], ids["red</w>"], ids["square</w>"]]].all()
    assert extra.sum() == only_specials.sum() + 4
    only = q.vocabulary_exclusion_mask(tokenizer, True, ["dog</w>"], only_tokens=["red</w>", ids["dog</w>"], "a</w>"])
    assert np.flatnonzero(~only).tolist() == sorted([ids["red</w>"], ids["a</w>"]])  # dog: excluded wins
    with pytest.raises(ValueError, match="only_tokens not in the vocabulary"):
        q.vocabulary_exclusion_mask(tokenizer, only_tokens=["zebra</w>"])


def test_masked_ids_never_win_and_get_zero_probability(tokenizer):
    mask = q.vocabulary_exclusion_mask(tokenizer)
    head = q.VocabularyHead(len(mask), q.excluded_ids(mask))
    features = jax.random.normal(jax.random.key(0), (4, 6, 16))
    params = head.init(jax.random.key(1), features)
    # Push the head towards masked tokens: they must still lose.
    bias = jnp.where(mask, 50.0, 0.0)
    params = {"params": {"dense": {**params["params"]["dense"], "bias": bias}}}
    logits = head.apply(params, features)
    assert logits.dtype == jnp.float32 and logits.shape == (4, 6, len(mask))
    assert not mask[np.asarray(q.argmax_tokens(logits))].any()
    for hard in (False, True):
        for tau in (2.0, 0.3):
            probs = q.gumbel_softmax(logits, jax.random.key(2), tau, hard)
            assert np.all(np.asarray(probs)[..., mask] == 0.0)
            assert not mask[np.asarray(probs.argmax(-1))].any()
    grad = jax.grad(lambda p: jnp.sum(q.gumbel_softmax(head.apply(p, features), jax.random.key(3), 0.3,
                                                       False)[..., :40] ** 2))(params)
    kernel_grad = np.asarray(grad["params"]["dense"]["kernel"])
    assert np.isfinite(kernel_grad).all() and np.all(kernel_grad[:, mask] == 0.0)
    assert np.abs(kernel_grad[:, ~mask]).sum() > 0


def test_straight_through_is_exactly_one_hot_with_the_soft_gradient():
    logits = jax.random.normal(jax.random.key(0), (3, 5, 97)) * 3
    weights = jax.random.normal(jax.random.key(1), (3, 5, 97))
    rng = jax.random.key(2)
    hard = jax.jit(lambda l: q.gumbel_softmax(l, rng, 0.7, True))(logits)
    assert set(np.unique(np.asarray(hard)).tolist()) == {0.0, 1.0}
    assert np.all(np.asarray(hard).sum(-1) == 1.0)
    soft = q.gumbel_softmax(logits, rng, 0.7, False)
    assert np.array_equal(np.asarray(hard).argmax(-1), np.asarray(soft).argmax(-1))
    grad = lambda h: jax.jit(jax.grad(lambda l: jnp.sum(weights * q.gumbel_softmax(l, rng, 0.7, h))))(logits)  # noqa: E731
    np.testing.assert_allclose(grad(True), grad(False), rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(grad(True))).sum() > 0


@pytest.mark.parametrize("kind,start_mid_end", [
    ("constant", (2.0, 2.0, 2.0)),
    ("exponential", (2.0, 0.7745967, 0.3)),  # 2 * (0.15)^0.5
    ("linear", (2.0, 1.15, 0.3)),
    ("cosine", (2.0, 1.15, 0.3)),
])
def test_temperature_schedules(kind, start_mid_end):
    fn = q.temperature_schedule(kind, 2.0, 0.3, 1000)
    values = [float(fn(s)) for s in (0, 500, 1000, 5000)]
    np.testing.assert_allclose(values, [*start_mid_end, start_mid_end[-1]], rtol=1e-6)
    assert float(jax.jit(fn)(jnp.int32(500))) == pytest.approx(start_mid_end[1], rel=1e-6)
    if kind == "cosine":
        assert float(fn(250)) == pytest.approx(0.3 + 1.7 * 0.5 * (1 + np.cos(np.pi / 4)), rel=1e-6)


@pytest.mark.parametrize("pad_token", [None, "!"])  # CLIP / SD1 (pad = EOS) and SD2 (pad = '!')
def test_assembly_matches_the_tokenizers_padded_layout(tokenizer, tmp_path, pad_token):
    from transformers import CLIPTokenizer
    tok = tokenizer if pad_token is None else CLIPTokenizer.from_pretrained(
        write_tiny_clip_vocab(tmp_path), pad_token=pad_token)
    texts = ["a red circle on the left", "the blue dog on a square"]
    ids = np.array([tok(t, add_special_tokens=False)["input_ids"] for t in texts])
    vocab, context = len(tok), 12
    noise = jax.random.normal(jax.random.key(0), (*ids.shape, vocab))
    logits = noise + 10.0 * jax.nn.one_hot(ids, vocab)  # the argmax ids are the texts' tokens
    argmax = q.argmax_tokens(logits)
    assert q.detokenize(tok, argmax) == texts
    layout = dict(bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                  context_length=context)
    expected = np.array(tok(texts, padding="max_length", max_length=context)["input_ids"])
    np.testing.assert_array_equal(q.assemble_ids(argmax, **layout), expected)
    soft = q.assemble_soft_tokens(jax.nn.one_hot(argmax, vocab), **layout)
    assert soft.shape == (2, context, vocab)
    np.testing.assert_array_equal(np.asarray(soft).argmax(-1), expected)
    np.testing.assert_array_equal(np.asarray(soft).sum(-1), 1.0)
    E = jax.random.normal(jax.random.key(1), (vocab, 8))
    np.testing.assert_allclose(q.assemble_token_embeddings(jax.nn.one_hot(argmax, vocab) @ E, E, **layout),
                               E[expected], rtol=1e-6)
    with pytest.raises(ValueError):
        q.assemble_ids(argmax, **{**layout, "context_length": ids.shape[1] + 1})


def _parity_setup(vocab=211, dim=6, width=10, shape=(2, 7)):
    keys = jax.random.split(jax.random.key(0), 5)
    features = jax.random.normal(keys[0], (*shape, width))
    kernel = jax.random.normal(keys[1], (width, vocab)) * 0.5
    bias = jax.random.normal(keys[2], (vocab,)) * 0.1
    E = jax.random.normal(keys[3], (vocab, dim))
    target = jax.random.normal(keys[4], (*shape, dim))
    mask = np.zeros(vocab, np.bool_)
    mask[[0, 3, 50, vocab - 1]] = True
    return features, kernel, bias, E, target, mask


@pytest.mark.parametrize("hard", [False, True])
def test_custom_vjp_matches_plain_gumbel_softmax_at_E(hard):
    features, kernel, bias, E, target, mask = _parity_setup()
    rng = jax.random.key(7)

    def loss(embed_fn, kernel, bias, tau, E):
        return jnp.mean((embed_fn(kernel, bias, tau, E) - target) ** 2)

    head = lambda k, b: q.apply_mask(features @ k + b, mask)  # noqa: E731
    forms = {
        "plain": lambda k, b, t, E: q.gumbel_softmax(head(k, b), rng, t, hard) @ E,
        "custom_rng": lambda k, b, t, E: q.soft_token_embeddings(head(k, b), rng, t, hard, E),
        "custom_noise": lambda k, b, t, E: q.soft_token_embeddings(
            head(k, b), q.gumbel_noise(rng, (*features.shape[:-1], E.shape[0])), t, hard, E),
        "fused": lambda k, b, t, E: q.fused_soft_token_embeddings(features, k, b, mask, rng, t, hard, E,
                                                                  rows_per_chunk=3, embedding_grad=True),
    }
    results = {name: jax.jit(jax.value_and_grad(lambda *a, f=f: loss(f, *a), argnums=(0, 1, 2, 3)))(
        kernel, bias, jnp.float32(0.8), E) for name, f in forms.items()}
    ref_value, ref_grads = results.pop("plain")
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in ref_grads)
    for name, (value, grads) in results.items():
        np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-6, err_msg=name)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=name)
    fwd = q.soft_token_embeddings(head(kernel, bias), rng, 0.8, hard, E)
    np.testing.assert_allclose(fwd, q.gumbel_softmax(head(kernel, bias), rng, 0.8, hard) @ E, rtol=1e-5,
                               atol=1e-6)


def test_gradient_reaches_the_vocabulary_head_through_the_embedding_matrix(tokenizer):
    """PAPER.md trap: the gradient must pass through soft @ E, with SOS/EOS/PAD assembled around it."""
    mask = q.vocabulary_exclusion_mask(tokenizer)
    vocab, context = len(mask), 12
    head = q.VocabularyHead(vocab, q.excluded_ids(mask))
    features = jax.random.normal(jax.random.key(0), (2, 5, 16))
    params = head.init(jax.random.key(1), features)
    E = jax.random.normal(jax.random.key(2), (vocab, 8))
    layout = dict(bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                  pad_id=tokenizer.pad_token_id, context_length=context)
    target = jax.random.normal(jax.random.key(3), (2, context, 8))

    def via_soft_tokens(p, hard):
        probs = q.gumbel_softmax(head.apply(p, features), jax.random.key(4), 1.0, hard)
        return jnp.sum((q.assemble_soft_tokens(probs, **layout) @ E - target) ** 2)

    def via_token_embeds(p, hard):
        embeds = q.soft_token_embeddings(head.apply(p, features), jax.random.key(4), 1.0, hard, E)
        return jnp.sum((q.assemble_token_embeddings(embeds, E, **layout) - target) ** 2)

    for hard in (False, True):
        g1 = jax.grad(via_soft_tokens)(params, hard)["params"]["dense"]["kernel"]
        g2 = jax.grad(via_token_embeds)(params, hard)["params"]["dense"]["kernel"]
        assert np.abs(np.asarray(g1)).sum() > 0
        np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-5)
    # And with E replaced by zeros the gradient vanishes: it really flows through E.
    E = jnp.zeros_like(E)
    g0 = jax.grad(via_soft_tokens)(params, False)["params"]["dense"]["kernel"]
    assert np.all(np.asarray(g0) == 0.0)


def bytes_per_example(batch=4, num=75, vocab=49_408, dim=64, width=128) -> dict[str, dict[str, float]]:
    """XLA memory of value_and_grad (w.r.t. the head) of a small loss through each formulation."""
    keys = jax.random.split(jax.random.key(0), 4)
    features = jax.random.normal(keys[0], (batch, num, width))
    kernel = jax.random.normal(keys[1], (width, vocab)) * 0.05
    bias = jnp.zeros(vocab)
    E = jax.random.normal(keys[2], (vocab, dim))
    mask = np.zeros(vocab, np.bool_)
    mask[:2000] = True
    rng, target = keys[3], jnp.zeros((batch, num, dim))
    head = lambda k, b: q.apply_mask(features @ k + b, mask)  # noqa: E731
    forms = {
        "plain gumbel_softmax @ E": lambda p: q.gumbel_softmax(head(*p), rng, 1.3, False) @ E,
        "soft_token_embeddings": lambda p: q.soft_token_embeddings(head(*p), rng, 1.3, False, E),
        "fused, rows_per_chunk = 16": lambda p: q.fused_soft_token_embeddings(
            features, *p, mask, rng, 1.3, False, E, rows_per_chunk=16),
        "fused, default (auto)": lambda p: q.fused_soft_token_embeddings(
            features, *p, mask, rng, 1.3, False, E),
    }
    report = {}
    for name, f in forms.items():
        loss = lambda p, f=f: jnp.mean((f(p) - target) ** 2)  # noqa: E731
        residuals = jax.tree.leaves(jax.eval_shape(lambda p: jax.vjp(loss, p)[1], (kernel, bias)))
        per_example = sum(r.size * r.dtype.itemsize for r in residuals if r.shape[:1] == (batch,))
        stats = jax.jit(jax.value_and_grad(loss)).lower((kernel, bias)).compile().memory_analysis()
        report[name] = {"residual_MB_per_example": per_example / batch / 1e6,
                        "temp_MB_per_example": stats.temp_size_in_bytes / batch / 1e6,
                        "argument_MB": stats.argument_size_in_bytes / 1e6}
    return report


def test_memory_report():
    report = bytes_per_example()
    for name, row in report.items():
        print(f"{name:30s} " + "  ".join(f"{k} {v:8.2f}" for k, v in row.items()))
    plain, custom, fused, auto = report.values()
    one_hot_mb = 75 * 49_408 * 4 / 1e6  # 14.8 MB
    assert plain["residual_MB_per_example"] >= one_hot_mb  # the soft one-hot is kept
    assert custom["residual_MB_per_example"] <= plain["residual_MB_per_example"]
    assert fused["residual_MB_per_example"] < 0.01 * one_hot_mb
    assert fused["temp_MB_per_example"] < 0.2 * plain["temp_MB_per_example"]
    # The default chunking (4 chunks of 75 rows here) keeps no more, and its temporaries stay within the
    # budget besides the head's [128, V] gradient accumulator.
    assert q.auto_rows_per_chunk(300, 49_408) == 75
    assert auto["residual_MB_per_example"] == fused["residual_MB_per_example"]
    assert 4 * auto["temp_MB_per_example"] <= q.CHUNK_BUDGET_MB + 128 * 49_408 * 4 / 1e6


def test_hard_tokens_through_the_frozen_clip_text_encoder_equal_its_run_on_the_argmax_ids(tokenizer):
    """PAPER.md: the hard-token forward equals the text encoder on the argmax ids, and the encoder's
    gradient is non-zero through (soft @ E), for both the soft_tokens and the token_embeds inputs."""
    clip_text = pytest.importorskip("dediffusion_jax.t2i.clip_text")
    mask = q.vocabulary_exclusion_mask(tokenizer)
    vocab, context, num = len(tokenizer), 12, 6
    config = clip_text.CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=context,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    text_model = clip_text.CLIPTextModel(config)
    text_params = text_model.init(jax.random.key(0), jnp.zeros((1, context), jnp.int32))
    E = clip_text.token_embedding_matrix(text_params)
    layout = dict(bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                  context_length=context)
    head = q.VocabularyHead(vocab, q.excluded_ids(mask))
    features = jax.random.normal(jax.random.key(1), (2, num, 16))
    head_params = head.init(jax.random.key(2), features)
    rng = jax.random.key(3)

    def states_soft(p):
        probs = q.gumbel_softmax(head.apply(p, features), rng, 0.5, hard=True)
        out = text_model.apply(text_params, soft_tokens=q.assemble_soft_tokens(probs, **layout))
        return out.last_hidden_state, probs

    def states_embeds(p):
        embeds = q.soft_token_embeddings(head.apply(p, features), rng, 0.5, True, E)
        out = text_model.apply(text_params, token_embeds=q.assemble_token_embeddings(embeds, E, **layout),
                               eos_positions=jnp.full((2,), num + 1))
        return out.last_hidden_state

    soft_states, probs = states_soft(head_params)
    ids = q.assemble_ids(probs.argmax(-1), **layout)
    on_ids = text_model.apply(text_params, ids).last_hidden_state
    np.testing.assert_allclose(soft_states, on_ids, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(states_embeds(head_params), on_ids, rtol=1e-5, atol=1e-5)
    g_soft = jax.grad(lambda p: jnp.sum(states_soft(p)[0] ** 2))(head_params)
    g_embeds = jax.grad(lambda p: jnp.sum(states_embeds(p) ** 2))(head_params)
    kernel = np.asarray(g_soft["params"]["dense"]["kernel"])
    assert np.abs(kernel).sum() > 0 and np.all(kernel[:, mask] == 0)
    np.testing.assert_allclose(g_embeds["params"]["dense"]["kernel"], kernel, rtol=1e-4, atol=1e-6)
