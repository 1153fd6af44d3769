"""CLIP text transformer: parity with transformers (torch), the soft-token path and its gradients."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dediffusion_jax.t2i import clip_text, convert
from dediffusion_jax.t2i.clip_text import CLIPTextConfig, CLIPTextModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Small stand-ins for the two real families: SD 1.x (OpenAI CLIP-L: quick_gelu, legacy eos_token_id=2 so
# transformers pools at argmax(ids)) and SD 2.x (OpenCLIP-H converted: gelu, the proper eos id).
CONFIGS = {
    "sd1": CLIPTextConfig(vocab_size=128, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                          bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "sd2": CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                          bos_token_id=998, eos_token_id=999, pad_token_id=0),
}


def _eot(config):
    # The token the tokenizer ends a prompt with: CLIP's last vocabulary entry.
    return config.vocab_size - 1


def _ids(config, batch=3, seed=0):
    """bos, words, eot, then padding (eot for SD1 style, pad id for SD2 style), prompts of varied length."""
    rng = np.random.default_rng(seed)
    L = config.max_position_embeddings
    ids = rng.integers(3, config.vocab_size - 3, size=(batch, L))
    lengths = [L // 3, L // 2, L - 1][:batch]
    mask = np.zeros((batch, L), np.int32)
    for b, n in enumerate(lengths):
        ids[b, 0] = config.bos_token_id if config.eos_token_id != 2 else config.vocab_size - 2
        ids[b, n] = _eot(config)
        pad = _eot(config) if config.eos_token_id == 2 else config.pad_token_id
        ids[b, n + 1:] = pad
        mask[b, : n + 1] = 1
    return ids.astype(np.int32), mask


def _torch_model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(config.to_dict())).eval()
    with torch.no_grad():  # perturb every tensor (incl. LayerNorm ones/zeros) so the mapping is tested
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    config = CONFIGS[request.param]
    tmodel = _torch_model(config)
    state = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    params = clip_text.params_from_torch(state, config, source=f"{request.param} state_dict")
    model = CLIPTextModel(config)
    apply = jax.jit(model.apply, static_argnames=("output_hidden_states",))
    return config, tmodel, model, params, apply


def _maxerr(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_config_from_dict_to_dict_roundtrip():
    for config in CONFIGS.values():
        d = config.to_dict()
        assert d["architectures"] == ["CLIPTextModel"] and d["model_type"] == "clip_text_model"
        assert CLIPTextConfig.from_dict({**d, "projection_dim": 512, "dtype": "float32"}) == config
        tcfg = transformers.CLIPTextConfig.from_dict(d)
        assert tcfg.hidden_act == config.hidden_act and tcfg.num_hidden_layers == config.num_hidden_layers
    with pytest.raises(ValueError, match="hidden_act.*'relu'"):
        CLIPTextConfig.from_dict({"hidden_act": "relu"})


@pytest.mark.parity
def test_parity_with_transformers(pair):
    config, tmodel, model, params, apply = pair
    ids, mask = _ids(config)
    with torch.no_grad():
        ref = tmodel(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
        ref_masked = tmodel(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    out = apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)
    out_masked = apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    errs = {
        "last_hidden_state": _maxerr(out.last_hidden_state, ref.last_hidden_state),
        "pooler_output": _maxerr(out.pooler_output, ref.pooler_output),
        "masked last_hidden_state": _maxerr(out_masked.last_hidden_state, ref_masked.last_hidden_state),
        "hidden_states[1]": _maxerr(out.hidden_states[1], ref.hidden_states[1]),
    }
    print(f"{config.hidden_act}: max abs errors {errs}")
    assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
    assert all(e <= 1e-4 for e in errs.values()), errs


def test_soft_one_hot_and_token_embeds_equal_ids(pair):
    config, _, model, params, apply = pair
    ids, _ = _ids(config, seed=1)
    ref = apply({"params": params}, jnp.asarray(ids))
    soft = jax.nn.one_hot(ids, config.vocab_size, dtype=jnp.float32)
    out_soft = apply({"params": params}, soft_tokens=soft)
    E = clip_text.token_embedding_matrix({"params": params})
    assert E.shape == (config.vocab_size, config.hidden_size)
    eos = clip_text.eos_positions_from_ids(jnp.asarray(ids), config.eos_token_id)
    out_emb = apply({"params": params}, token_embeds=soft @ E, eos_positions=eos)
    for out in (out_soft, out_emb):
        assert _maxerr(out.last_hidden_state, ref.last_hidden_state) <= 1e-6
        assert _maxerr(out.pooler_output, ref.pooler_output) <= 1e-6
    assert apply({"params": params}, token_embeds=soft @ E).pooler_output is None


def test_gradient_flows_through_the_token_embedding_matrix():
    config = CONFIGS["sd2"]
    model = CLIPTextModel(config)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), *clip_text.dummy_inputs(config))["params"]
    # Relaxed tokens supported on a few vocabulary entries only (like a peaked Gumbel-softmax).
    rng = np.random.default_rng(0)
    support = rng.choice(config.vocab_size, size=12, replace=False)
    logits = rng.normal(size=(2, 10, support.size))
    soft = np.zeros((2, 10, config.vocab_size), np.float32)
    soft[..., support] = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)

    def loss(p, s):
        out = model.apply({"params": p}, soft_tokens=s)
        return jnp.sum(out.last_hidden_state**2) + jnp.sum(out.pooler_output)

    g_params, g_soft = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(soft))
    assert np.all(np.isfinite(g_soft)) and np.abs(g_soft).max() > 0
    g_E = np.asarray(clip_text.token_embedding_matrix(g_params))
    used = np.abs(g_E).sum(-1) > 0
    assert set(np.flatnonzero(used)) == set(support.tolist())


def test_exactly_one_input_entry():
    config = CONFIGS["sd1"]
    model = CLIPTextModel(config)
    ids = clip_text.dummy_inputs(config)[0]
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)
    with pytest.raises(ValueError, match="exactly one of"):
        jax.eval_shape(functools.partial(model.apply, soft_tokens=jnp.zeros((1, 16, 128))), params, ids)
    with pytest.raises(ValueError, match="exactly one of"):
        jax.eval_shape(model.apply, params)


@pytest.mark.parity
def test_flax_to_torch_loads_strictly_and_reproduces(tmp_path):
    config = CONFIGS["sd1"]
    model = CLIPTextModel(config)
    params = jax.jit(model.init)(jax.random.PRNGKey(3), *clip_text.dummy_inputs(config))["params"]
    state = convert.flax_to_torch(params)  # published layout: text_model.embeddings...
    assert "text_model.encoder.layers.1.self_attn.q_proj.weight" in state
    ids, _ = _ids(config, seed=2)
    ours = model.apply({"params": params}, jnp.asarray(ids))

    # transformers v5 CLIPTextModel holds the keys without the `text_model.` prefix.
    fresh = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(config.to_dict())).eval()
    stripped = {k.removeprefix("text_model."): torch.tensor(v) for k, v in state.items()}
    fresh.load_state_dict(stripped, strict=True)  # position_ids is a non-persistent buffer
    with torch.no_grad():
        ref = fresh(input_ids=torch.from_numpy(ids).long())
    assert _maxerr(ours.last_hidden_state, ref.last_hidden_state) <= 1e-4

    # As a folder (config.json + model.safetensors), the way a diffusers pipeline reads a text encoder.
    import json

    from safetensors.numpy import save_file

    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    loaded, info = transformers.CLIPTextModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        ref2 = loaded.eval()(input_ids=torch.from_numpy(ids).long())
    assert _maxerr(ours.last_hidden_state, ref2.last_hidden_state) <= 1e-4
    # and back: the published (prefixed) layout loads directly, without aliases
    again = convert.torch_to_flax(state, params, ignore=clip_text.TORCH_IGNORE)
    assert _maxerr(clip_text.token_embedding_matrix(again), clip_text.token_embedding_matrix(params)) == 0


@pytest.mark.parity
def test_wrong_shape_names_the_key():
    config = CONFIGS["sd1"]
    other = _torch_model(dataclasses.replace(config, intermediate_size=40))
    state = {k: v.numpy() for k, v in other.state_dict().items()}
    with pytest.raises(convert.CheckpointMismatchError, match=r"encoder\.layers\.0\.mlp\.fc1\.weight"):
        clip_text.params_from_torch(state, config)


def test_bf16_compute_stays_close(pair):
    config, _, _, params, apply = pair
    ids, _ = _ids(config, seed=4)
    ref = apply({"params": params}, jnp.asarray(ids))
    out = jax.jit(CLIPTextModel(config, dtype=jnp.bfloat16).apply)({"params": params}, jnp.asarray(ids))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    err = _maxerr(out.last_hidden_state, ref.last_hidden_state)
    print(f"{config.hidden_act}: bf16 max abs error {err:.3g}")
    assert err < 0.15 * float(np.abs(ref.last_hidden_state).max())
