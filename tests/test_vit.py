"""ViT backbone: parity with transformers' CLIPVisionModel, checkpoint loading, position resizing, remat."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dediffusion_jax.models import vit
from dediffusion_jax.models.vit import ViT, ViTConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=37,
                  hidden_act="quick_gelu")


def _maxerr(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def torch_tower(tmp_path_factory):
    """A random CLIPVisionModel (every tensor perturbed) saved with save_pretrained as safetensors."""
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig.from_dict(SMALL.to_dict())).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("clip_vision")
    model.save_pretrained(str(folder), safe_serialization=True)
    return model, folder


def _images(config, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, config.image_size, config.image_size, 3)).astype(np.float32)


def test_config_dicts():
    assert ViTConfig.from_dict(SMALL.to_dict()) == SMALL
    full = {"model_type": "clip", "vision_config": SMALL.to_dict(), "text_config": {}}
    assert ViTConfig.from_dict(full) == SMALL
    with pytest.raises(ValueError, match="hidden_act.*'silu'"):
        ViTConfig.from_dict({**SMALL.to_dict(), "hidden_act": "silu"})
    assert ViTConfig.named("L/14", image_size=224).num_output_tokens == 257


@pytest.mark.parity
def test_parity_with_clip_vision_model(torch_tower):
    tmodel, folder = torch_tower
    config, params = vit.load_clip_vision(folder)
    assert config == SMALL
    images = _images(config)
    with torch.no_grad():
        ref = tmodel(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
        ref_tokens = tmodel.post_layernorm(ref.last_hidden_state)
    out = jax.jit(ViT(config).apply, static_argnames="output_hidden_states")(
        {"params": params}, jnp.asarray(images), output_hidden_states=True
    )
    errs = {
        "last_hidden_state (no post-LN)": _maxerr(out.last_hidden_state, ref.last_hidden_state),
        "pooler_output (post-LN CLS)": _maxerr(out.pooler_output, ref.pooler_output),
        "tokens (post-LN, all)": _maxerr(out.tokens, ref_tokens),
        "hidden_states[0] (after pre_layrnorm)": _maxerr(out.hidden_states[0], ref.hidden_states[0]),
    }
    print(f"ViT parity max abs errors {errs}")
    assert out.tokens.shape == (2, 17, 32)
    assert all(e <= 1e-4 for e in errs.values()), errs


def test_load_errors_and_transformers_prefix(torch_tower, tmp_path):
    _, folder = torch_tower
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        vit.load_clip_vision(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickle weights.*safetensors only.*save_pretrained"):
        vit.load_clip_vision(tmp_path)
    # The published layout (vision_model.* prefix, as transformers 4.x wrote it) loads too.
    from safetensors.numpy import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    save_file({f"vision_model.{k}": v for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, p_prefixed = vit.load_clip_vision(tmp_path / "model.safetensors")
    _, p_plain = vit.load_clip_vision(folder)
    assert jax.tree.all(jax.tree.map(np.array_equal, p_prefixed, p_plain))


def test_position_embedding_resize(torch_tower, caplog):
    _, folder = torch_tower
    config, params = vit.load_clip_vision(folder)
    pos = params["vision_model"]["embeddings"]["position_embedding"]["embedding"]
    same = vit.resize_position_embedding(pos, config.grid_size, config.grid_size)
    assert _maxerr(same, pos) <= 1e-6

    with caplog.at_level(logging.WARNING, logger="dediffusion_jax.models.vit"):
        big_config, big = vit.load_clip_vision(folder, image_size=24)
    assert "resizing position embeddings" in caplog.text
    assert big_config.image_size == 24 and big_config.num_output_tokens == 37
    big_pos = big["vision_model"]["embeddings"]["position_embedding"]["embedding"]
    assert big_pos.shape == (37, 32)
    np.testing.assert_array_equal(big_pos[0], pos[0])  # CLS row kept
    out = jax.jit(ViT(big_config).apply)({"params": big}, jnp.asarray(_images(big_config, batch=1)))
    assert out.tokens.shape == (1, 37, 32) and np.all(np.isfinite(out.tokens))


def test_remat_gives_identical_outputs_and_gradients():
    config = dataclasses.replace(SMALL, hidden_act="gelu", output_tokens="patches")
    images = jnp.asarray(_images(config))
    params = jax.jit(ViT(config).init)(jax.random.PRNGKey(0), images)["params"]

    def loss(p, model):
        return jnp.sum(model.apply({"params": p}, images).tokens ** 2)

    results = [
        jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, ViT(config, remat=r)) for r in (False, True)
    ]
    (v0, g0), (v1, g1) = results
    assert float(v0) == float(v1)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.allclose(a, b, rtol=0, atol=1e-6)), g0, g1))
    out = ViT(config, remat=True).apply({"params": params}, images)
    assert out.tokens.shape == (2, 16, 32)  # "patches": CLS dropped


@pytest.mark.parametrize(
    "name,image_size,tokens,width",
    [("Ti/16", 224, 197, 192), ("S/16", 224, 197, 384), ("B/16", 224, 197, 768),
     ("L/14", 224, 257, 1024), ("L/18", 288, 257, 1024), ("H/14", 224, 257, 1280)],
)
def test_named_variant_shapes(name, image_size, tokens, width):
    config = ViTConfig.named(name, image_size=image_size)
    model = ViT(config)
    out, variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.PRNGKey(0), x), *vit.dummy_inputs(config, batch=2)
    )
    assert out.tokens.shape == (2, tokens, width)
    layers = [k for k in variables["params"]["vision_model"]["encoder"] if k.startswith("layers_")]
    assert len(layers) == config.num_layers
    fc1 = variables["params"]["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert fc1.shape == (width, 4 * width)


def test_without_cls_token():
    config = dataclasses.replace(SMALL, use_cls_token=False)
    out, variables = jax.eval_shape(
        lambda x: ViT(config).init_with_output(jax.random.PRNGKey(0), x), *vit.dummy_inputs(config)
    )
    assert out.tokens.shape == (1, 16, 32) and out.pooler_output is None
    assert "class_embedding" not in variables["params"]["vision_model"]["embeddings"]
