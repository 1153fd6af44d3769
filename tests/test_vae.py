"""AutoencoderKL port: config round trip, checkpoint loading, parity with diffusers' torch VAE."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dediffusion_jax.t2i import convert, vae

# Two levels (one downsample: 16 px -> 8 x 8 latents), 8 groups, 4 latent channels.
SMALL = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 16,
    "scaling_factor": 0.18215,
    "force_upcast": True,  # irrelevant to the port: ignored
}
TOL = 1e-4


def test_config_from_dict_reads_diffusers_json_and_ignores_extras():
    cfg = vae.VAEConfig.from_dict(SMALL)
    assert cfg.block_out_channels == (32, 64)
    assert cfg.down_block_types == ("DownEncoderBlock2D",) * 2
    assert cfg.shift_factor is None and cfg.use_quant_conv and cfg.mid_block_add_attention
    assert cfg.downsample_factor == 2
    assert vae.VAEConfig.from_dict(cfg.to_dict()) == cfg
    assert vae.VAEConfig.from_dict({**SMALL, "shift_factor": 0.5}).shift_factor == 0.5


@pytest.mark.parametrize(
    "key, value",
    [
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
        ("act_fn", "gelu"),
    ],
)
def test_config_rejects_unsupported_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key) as err:
        vae.VAEConfig.from_dict({**SMALL, key: value})
    if key.endswith("block_types"):
        assert value[1] in str(err.value)


def test_param_tree_mirrors_diffusers_names():
    cfg = vae.VAEConfig.from_dict(SMALL)
    abstract = jax.eval_shape(vae.AutoencoderKL(cfg).init, jax.random.PRNGKey(0),
                              *vae.dummy_inputs(cfg))["params"]
    keys = set(convert.flax_to_torch(jax.tree.map(lambda s: np.zeros(s.shape), abstract)))
    for key in (
        "encoder.down_blocks.0.resnets.0.conv1.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.mid_block.attentions.0.to_q.weight",
        "encoder.mid_block.attentions.0.to_out.0.bias",
        "encoder.mid_block.attentions.0.group_norm.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up_blocks.1.resnets.1.norm2.bias",  # layers_per_block + 1 resnets,
        "decoder.conv_norm_out.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ):
        assert key in keys, key


# ---------------------------------------------------------------------------------------------
# Parity with diffusers (torch)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    """A diffusers AutoencoderKL with every weight randomised, and its Flax twin."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    torch_vae = diffusers.AutoencoderKL.from_config(SMALL).eval()
    with torch.no_grad():
        for name, p in torch_vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn_like(p))
            else:  # fan-in scaled, so activations stay O(1) through the stack
                p.copy_(torch.randn_like(p) * (1.5 / np.sqrt(p[0].numel())))
    cfg = vae.VAEConfig.from_dict(dict(torch_vae.config))
    model = vae.AutoencoderKL(cfg)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *vae.dummy_inputs(cfg))["params"]
    state = {k: v.numpy() for k, v in torch_vae.state_dict().items()}
    params = convert.torch_to_flax(state, abstract, ignore=vae.TORCH_IGNORE,
                                   aliases=vae.TORCH_ALIASES)
    return torch, torch_vae, cfg, model, params


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parity
def test_encode_decode_match_diffusers(reference):
    torch, torch_vae, cfg, model, params = reference
    rng = np.random.RandomState(0)
    images = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    z = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        posterior = torch_vae.encode(torch.from_numpy(images)).latent_dist
        decoded = torch_vae.decode(torch.from_numpy(z)).sample

    mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(
        params, images.transpose(0, 2, 3, 1))
    out = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(
        params, z.transpose(0, 2, 3, 1))

    errors = {
        "mean": np.abs(np.asarray(mean) - _nhwc(posterior.mean)).max(),
        "logvar": np.abs(np.asarray(logvar) - _nhwc(posterior.logvar)).max(),
        "decode": np.abs(np.asarray(out) - _nhwc(decoded)).max(),
    }
    print("VAE fp32 max abs errors vs diffusers:", errors)
    assert np.abs(_nhwc(decoded)).max() > 0.1  # the comparison is not between two near-zero maps
    assert all(e <= TOL for e in errors.values()), errors


@pytest.mark.parity
def test_scaled_latent_helpers_match_diffusers_convention(reference):
    torch, torch_vae, cfg, model, params = reference
    images = np.random.RandomState(1).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    for shift in (None, 0.1):
        c = vae.VAEConfig.from_dict({**cfg.to_dict(), "shift_factor": shift})
        with torch.no_grad():
            mean = torch_vae.encode(torch.from_numpy(images)).latent_dist.mean
            expected = (mean - (shift or 0.0)) * c.scaling_factor  # as SD3 / Flux pipelines do
            pixels = torch_vae.decode(expected / c.scaling_factor + (shift or 0.0)).sample
        latents = vae.latents_from_images(params, c, images.transpose(0, 2, 3, 1))
        np.testing.assert_allclose(np.asarray(latents), _nhwc(expected), atol=TOL)
        back = vae.images_from_latents(params, c, latents)
        np.testing.assert_allclose(np.asarray(back), _nhwc(pixels), atol=TOL)
    sampled = vae.latents_from_images(params, cfg, images.transpose(0, 2, 3, 1),
                                      rng=jax.random.PRNGKey(0))
    assert sampled.shape == (1, 8, 8, 4) and not np.allclose(sampled, latents)


@pytest.mark.parity
def test_flax_to_torch_round_trip_loads_strictly(reference):
    torch, torch_vae, cfg, model, params = reference
    diffusers = pytest.importorskip("diffusers")
    fresh = diffusers.AutoencoderKL.from_config(cfg.to_dict()).eval()
    state = {k: torch.from_numpy(v) for k, v in convert.flax_to_torch(params).items()}
    fresh.load_state_dict(state, strict=True)
    for key, value in torch_vae.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(), err_msg=key)


@pytest.mark.parity
def test_legacy_attention_names_and_conv_shapes_load(reference):
    """Old checkpoints: query/key/value/proj_attn, sometimes as 1x1 conv [O, I, 1, 1] weights."""
    torch, torch_vae, cfg, model, params = reference
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in torch_vae.state_dict().items():
        value = value.numpy()
        for new, old in renames.items():
            if f"attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if key.endswith("weight"):
                    value = value[:, :, None, None]
        legacy[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    with pytest.raises(convert.CheckpointMismatchError, match="proj_attn"):
        convert.torch_to_flax(legacy, abstract, aliases=vae.TORCH_ALIASES)
    loaded = convert.torch_to_flax(vae.squeeze_legacy_attention(legacy), abstract,
                                   ignore=vae.TORCH_IGNORE, aliases=vae.TORCH_ALIASES)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_bfloat16_compute_stays_close():
    cfg = vae.VAEConfig.from_dict(SMALL)
    params = jax.jit(vae.AutoencoderKL(cfg).init)(jax.random.PRNGKey(0),
                                                  *vae.dummy_inputs(cfg))["params"]
    z = jnp.asarray(np.random.RandomState(2).normal(size=(1, 8, 8, 4)), jnp.float32)
    fp32 = vae.images_from_latents(params, cfg, z)
    bf16 = vae.images_from_latents(params, cfg, z, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16
    assert np.abs(np.asarray(bf16, np.float32) - np.asarray(fp32)).max() < 0.1
