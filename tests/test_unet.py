"""The Flax UNet2DConditionModel against diffusers' torch UNet, on tiny random configs.

Each config is built in torch, every parameter perturbed (diffusers zero-inits some convs, which would
hide bugs in whatever follows them), moved to Flax with `convert.torch_to_flax`, and the outputs
compared (torch is NCHW, ours NHWC). Models are shared per config through module-scoped fixtures.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dediffusion_jax.t2i import convert
from dediffusion_jax.t2i.unet import TORCH_IGNORE, UNet2DConditionModel, UNetConfig, dummy_inputs

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# (a) SD 1.x-like: int attention_head_dim (= number of heads), 1x1-conv projections, 4-ch latent,
#     two cross-attention down blocks then a plain one, 2 layers per block.
SD1 = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[8, 16, 16], layers_per_block=2, norm_num_groups=4,
    cross_attention_dim=24, attention_head_dim=2,
)
# (b) SD 2.x-like: per-block heads, linear projections, upcast attention; plus the less common
#     options (per-block layers, 2 transformer layers, shifted/unflipped time embedding, centred
#     input, asymmetric downsample padding, mid scale factor, 1x1 conv_in / 5x5 conv_out).
SD2 = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[8, 16, 24], layers_per_block=[1, 2, 1], norm_num_groups=4,
    cross_attention_dim=16, attention_head_dim=[2, 4, 4], use_linear_projection=True,
    upcast_attention=True, transformer_layers_per_block=2, flip_sin_to_cos=False, freq_shift=1,
    center_input_sample=True, downsample_padding=0, mid_block_scale_factor=1.5,
    conv_in_kernel=1, conv_out_kernel=5,
)
# (c) pixel-space decoder like the miniature world's: 3 channels, 16x16, attention everywhere.
PIXEL = dict(
    sample_size=16, in_channels=3, out_channels=3,
    down_block_types=["CrossAttnDownBlock2D"] * 3, up_block_types=["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[32, 64, 128], layers_per_block=1, norm_num_groups=8,
    cross_attention_dim=64, attention_head_dim=4,
)
# (d) no mid block, attention only in the lower-resolution block.
NO_MID = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], mid_block_type=None,
    block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
    cross_attention_dim=8, attention_head_dim=2,
)
# (e) the pixel decoder with diffusers' "text" addition embedding (pooled text -> time embedding).
PIXEL_TEXT = dict(PIXEL, addition_embed_type="text", addition_embed_type_num_heads=4)
CONFIGS = {"sd1": SD1, "sd2": SD2, "pixel": PIXEL, "no_mid": NO_MID, "pixel_text": PIXEL_TEXT}
TEXT_LEN = 7


@dataclasses.dataclass
class Case:
    torch_model: Any
    config: UNetConfig
    params: dict
    inputs: tuple[np.ndarray, np.ndarray, np.ndarray]  # NHWC sample, [B] timesteps, text states
    reference: np.ndarray  # torch output, NHWC


def _torch_unet(config: dict, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _torch_forward(model: Any, sample: np.ndarray, t: np.ndarray, text: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                    torch.from_numpy(text)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _inputs(cfg: UNetConfig, batch: int = 2, seed: int = 0, size: int | None = None):
    rng = np.random.default_rng(seed)
    s = size or cfg.sample_size
    sample = rng.standard_normal((batch, s, s, cfg.in_channels)).astype(np.float32)
    t = np.array([3.5, 999.0] if cfg.in_channels == 3 else [10, 700])[:batch]  # float and int
    text = rng.standard_normal((batch, TEXT_LEN, cfg.cross_attention_dim)).astype(np.float32)
    return sample, t, text


def _make_case(name: str) -> Case:
    tm = _torch_unet(CONFIGS[name])
    cfg = UNetConfig.from_dict(dict(tm.config))
    abstract = jax.eval_shape(UNet2DConditionModel(cfg).init, jax.random.PRNGKey(0), *dummy_inputs(cfg))
    state = {k: v.numpy() for k, v in tm.state_dict().items()}
    params = convert.torch_to_flax(state, abstract["params"], ignore=TORCH_IGNORE)
    inputs = _inputs(cfg)
    return Case(tm, cfg, params, inputs, _torch_forward(tm, *inputs))


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    return {}


def _case(cases: dict[str, Case], name: str) -> Case:
    if name not in cases:
        cases[name] = _make_case(name)
    return cases[name]


def _apply(cfg: UNetConfig, params: dict, *inputs, **module_kwargs) -> np.ndarray:
    model = UNet2DConditionModel(cfg, **module_kwargs)
    return np.asarray(jax.jit(model.apply)({"params": params}, *inputs), dtype=np.float32)


@pytest.mark.parity
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(cases, name):
    case = _case(cases, name)
    out = _apply(case.config, case.params, *case.inputs)
    err = np.abs(out - case.reference).max()
    print(f"{name}: max abs err {err:.2e} (output max {np.abs(case.reference).max():.2f})")
    assert out.shape == case.reference.shape
    assert err <= 1e-4


@pytest.mark.parity
def test_matches_diffusers_when_size_is_not_a_multiple_of_the_downsampling(cases):
    """10x10 through two downsamplings: 10 -> 5 -> 3, upsampled back to the skips' 5 and 10."""
    case = _case(cases, "sd1")
    inputs = _inputs(case.config, size=10)
    ref = _torch_forward(case.torch_model, *inputs)
    err = np.abs(_apply(case.config, case.params, *inputs) - ref).max()
    print(f"sd1 10x10: max abs err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parity
def test_flax_params_load_into_diffusers_strictly(cases):
    case = _case(cases, "sd1")
    fresh = diffusers.UNet2DConditionModel.from_config(case.config.to_dict()).eval()
    state = {k: torch.from_numpy(v) for k, v in convert.flax_to_torch(case.params).items()}
    fresh.load_state_dict(state, strict=True)
    np.testing.assert_array_equal(_torch_forward(fresh, *case.inputs), case.reference)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trips_through_diffusers(name):
    tm_config = dict(diffusers.UNet2DConditionModel.from_config(CONFIGS[name]).config)
    cfg = UNetConfig.from_dict(tm_config)
    again = diffusers.UNet2DConditionModel.from_config(cfg.to_dict()).config
    assert UNetConfig.from_dict(dict(again)) == cfg
    assert cfg.to_dict()["_class_name"] == "UNet2DConditionModel"


def test_num_attention_heads_quirk():
    """attention_head_dim means the number of heads unless num_attention_heads is given."""
    base = dict(SD2, attention_head_dim=[2, 4, 4])
    assert UNetConfig.from_dict(base).heads_per_block == (2, 4, 4)
    cfg = UNetConfig.from_dict(dict(base, attention_head_dim=64, num_attention_heads=[1, 2, 3]))
    assert cfg.heads_per_block == (1, 2, 3)
    assert cfg.to_dict()["attention_head_dim"] == [1, 2, 3]
    assert cfg.to_dict()["num_attention_heads"] is None


@pytest.mark.parametrize(
    "override, key",
    [
        ({"down_block_types": ["CrossAttnDownBlock2D", "FooBlock2D", "DownBlock2D"]},
         "down_block_types[1] = 'FooBlock2D'"),
        ({"up_block_types": ["UpBlock2D", "SimpleCrossAttnUpBlock2D", "UpBlock2D"]},
         "up_block_types[1] = 'SimpleCrossAttnUpBlock2D'"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"class_embed_type": "timestep"}, "class_embed_type = 'timestep'"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"addition_embed_type": "text", "addition_embed_type_num_heads": 5},
         "unet config: cross_attention_dim = 24 is not divisible by addition_embed_type_num_heads = 5"),
        ({"attention_type": "gated"}, "attention_type = 'gated'"),
        ({"only_cross_attention": True}, "only_cross_attention"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type"),
        ({"act_fn": "gelu"}, "act_fn = 'gelu'"),
        ({"layers_per_block": [1, 2]}, "layers_per_block"),
    ],
)
def test_unsupported_config_names_the_key(override, key):
    if not key.startswith("unet config:"):
        key = "unet config: unsupported " + key
    with pytest.raises(ValueError, match=re.escape(key)):
        UNetConfig.from_dict(dict(SD1, **override))


def _loss(cfg: UNetConfig, params: dict, sample, t, remat: bool):
    model = UNet2DConditionModel(cfg, remat=remat)

    def loss(text: jax.Array) -> jax.Array:
        return jnp.mean(model.apply({"params": params}, sample, t, text) ** 2)

    return jax.jit(jax.value_and_grad(loss))


@pytest.fixture(scope="module")
def text_grads(cases) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """(loss, d loss / d encoder_hidden_states) for the SD1 case, without and with remat."""
    case = _case(cases, "sd1")
    sample, t, text = case.inputs
    out = {}
    for remat in (False, True):
        value, grad = _loss(case.config, case.params, sample, t, remat)(text)
        out[remat] = (np.asarray(value), np.asarray(grad))
    return out


def test_gradient_wrt_text_is_finite_and_nonzero(text_grads):
    _, grad = text_grads[False]
    assert np.all(np.isfinite(grad))
    assert np.abs(grad).max() > 0
    assert np.all(np.abs(grad).reshape(grad.shape[0], -1).max(axis=1) > 0)  # every example


def test_remat_gives_the_same_numbers(cases, text_grads):
    case = _case(cases, "sd1")
    np.testing.assert_allclose(
        _apply(case.config, case.params, *case.inputs, remat=True), case.reference, atol=1e-4)
    np.testing.assert_allclose(text_grads[True][0], text_grads[False][0], rtol=1e-6)
    np.testing.assert_allclose(text_grads[True][1], text_grads[False][1], rtol=1e-5, atol=1e-9)


def test_bfloat16_compute_stays_close(cases):
    case = _case(cases, "sd1")
    out = _apply(case.config, case.params, *case.inputs, dtype=jnp.bfloat16)
    scale = np.abs(case.reference).max()
    err = np.abs(out - case.reference).max()
    print(f"sd1 bf16: max abs err {err:.2e} (output max {scale:.2f})")
    assert np.all(np.isfinite(out))
    assert err <= 0.05 * scale



@pytest.mark.parity
def test_scalar_timestep_broadcasts_over_the_batch(cases):
    """A scalar t means the same t for every example, as in diffusers."""
    case = _case(cases, "sd1")
    sample, _, text = case.inputs
    with torch.no_grad():
        ref = case.torch_model(torch.from_numpy(sample.transpose(0, 3, 1, 2)), 700,
                               torch.from_numpy(text)).sample.numpy().transpose(0, 2, 3, 1)
    out = _apply(case.config, case.params, sample, jnp.asarray(700), text)
    assert np.abs(out - ref).max() <= 1e-4


# ------------------------------------------- project extension: attention_position_embedding


@pytest.mark.slow  # the default run stayed over 20 min on a slower 2-core machine (2026-12-07): .ci/run's slow phase runs it
def test_position_embedding_starts_as_the_stock_model_and_then_tells_cells_apart(cases):
    """Zero-initialised, the extension computes exactly the stock (diffusers-equal) model; a non-zero
    embedding changes the output, and the params it adds are the `pos_embed` of every transformer."""
    case = _case(cases, "pixel_text")
    cfg = dataclasses.replace(case.config, attention_position_embedding=True)
    fresh = UNet2DConditionModel(cfg).init(jax.random.key(0), *dummy_inputs(cfg))["params"]
    flat = convert.flax_to_torch(fresh)
    extra = sorted(k for k in flat if k.endswith("pos_embed"))
    assert extra == sorted(k.removesuffix("proj_in.weight") + "pos_embed" for k in convert.flax_to_torch(case.params)
                           if re.search(r"attentions\.\d+\.proj_in\.weight$", k))
    assert {k: v.shape for k, v in flat.items() if k not in extra} == {
        k: v.shape for k, v in convert.flax_to_torch(case.params).items()}
    params = convert.torch_to_flax({**convert.flax_to_torch(case.params),
                                    **{k: np.zeros_like(flat[k]) for k in extra}}, fresh)
    out = _apply(cfg, params, *case.inputs)
    assert np.abs(out - case.reference).max() <= 1e-4
    bumped = convert.torch_to_flax({**convert.flax_to_torch(case.params),
                                    **{k: 0.5 * np.ones_like(flat[k]) for k in extra}}, fresh)
    assert np.abs(_apply(cfg, bumped, *case.inputs) - out).max() > 1e-2


def test_position_embedding_key_is_written_only_when_used():
    stock = UNetConfig.from_dict(PIXEL)
    assert "attention_position_embedding" not in stock.to_dict()
    ext = dataclasses.replace(stock, attention_position_embedding=True)
    assert ext.to_dict()["attention_position_embedding"] is True
    assert UNetConfig.from_dict(ext.to_dict()) == ext
