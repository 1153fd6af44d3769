"""The FID InceptionV3 (TF "2015-12-05" graph, as ported by pytorch-fid) in Flax linen, NHWC.

Why: FID is only comparable with published numbers (the paper's reconstruction FID included) when
the features come from exactly this network: pytorch-fid's `fid_inception_v3()`, i.e. torchvision's
Inception3 patched with FIDInceptionA / FIDInceptionC (3x3 average pools that do not count the zero
padding, as TensorFlow does), FIDInceptionE_1 (the same) and FIDInceptionE_2 (a 3x3 *max* pool in
the pool branch, a quirk of the TF graph), BatchNorm eps 1e-3 with running statistics, and the
2048-d global-average "pool3" output. Preprocessing follows pytorch-fid's `InceptionV3.forward`:
images in [0, 1] (uint8 / 255, as `ToTensor` gives), bilinear resize to 299x299 with
`align_corners=False` and no antialiasing (`F.interpolate`), then `2x - 1`.

Param paths mirror the pytorch-fid state-dict keys: `Mixed_5b.branch5x5_1.conv.weight` is
`params/Mixed_5b/branch5x5_1/conv/kernel`, `...bn.weight/bias` are `params/.../bn/scale|bias`, and
`...bn.running_mean/var` are `batch_stats/.../bn/mean|var`. `variables_from_torch` splits a state
dict into the two collections and maps each with `t2i.convert.torch_to_flax` (shape-checked);
`variables_to_torch` is the inverse (`convert.flax_to_torch` would split names such as `branch5x5_1`
into a list index, so it is not used here).

The architecture is fixed (no config.json exists for it), so there is no `XConfig`; the checkpoint
is converted once with `python -m dediffusion_jax.evaluation.convert_inception` and loaded with
`load_inception`, which only reads safetensors.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dediffusion_jax import weights
from dediffusion_jax.t2i import convert

FID_INPUT_SIZE = 299
FEATURE_DIM = 2048
EXTRACTOR_NAME = "inception_v3_fid_pool3"
# The pytorch-fid checkpoint also holds the 1008-way classifier and (depending on the torch version
# that wrote it) BatchNorm step counters; neither takes part in the pool3 features.
TORCH_IGNORE: tuple[str, ...] = (r"^fc\.", r"\.num_batches_tracked$")
_BATCH_STATS_ALIASES = {r"\.running_mean$": ".mean", r"\.running_var$": ".var"}
_BN_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: bias-free conv -> BatchNorm(eps=1e-3, inference) -> ReLU."""

    features: int
    kernel_size: int | tuple[int, int]
    strides: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dtype: Any = jnp.float32
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(
            self.features,
            _pair(self.kernel_size),
            strides=_pair(self.strides),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TF's average pool (and pytorch-fid's patch) ignores the zero padding: count_include_pad=False.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, pad: int) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    """FIDInceptionA (Mixed_5b/c/d)."""

    pool_features: int
    dtype: Any = jnp.float32
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype, precision=self.precision)
        b1 = conv(64, 1, name="branch1x1")(x)
        b5 = conv(48, 1, name="branch5x5_1")(x)
        b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = conv(64, 1, name="branch3x3dbl_1")(x)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision InceptionB (Mixed_6a, grid reduction 35 -> 17)."""

    dtype: Any = jnp.float32
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype, precision=self.precision)
        b3 = conv(384, 3, strides=2, name="branch3x3")(x)
        bd = conv(64, 1, name="branch3x3dbl_1")(x)
        bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = conv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        bp = _max_pool_3x3(x, stride=2, pad=0)
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC (Mixed_6b..6e), factorised 7x7 convolutions."""

    channels_7x7: int
    dtype: Any = jnp.float32
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, 1, name="branch1x1")(x)
        b7 = conv(c7, 1, name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, 1, name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, 1, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision InceptionD (Mixed_7a, grid reduction 17 -> 8)."""

    dtype: Any = jnp.float32
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype, precision=self.precision)
        b3 = conv(192, 1, name="branch3x3_1")(x)
        b3 = conv(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = conv(192, 1, name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, 3, strides=2, name="branch7x7x3_4")(b7)
        bp = _max_pool_3x3(x, stride=2, pad=0)
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (`pool="avg"`, Mixed_7b) and FIDInceptionE_2 (`pool="max"`, Mixed_7c)."""

    pool: str = "avg"
    dtype: Any = jnp.float32
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype, precision=self.precision)
        b1 = conv(320, 1, name="branch1x1")(x)
        b3 = conv(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, 1, name="branch3x3dbl_1")(x)
        bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3_same(x)
        elif self.pool == "max":  # the TF graph's quirk in the last block
            pooled = _max_pool_3x3(x, stride=1, pad=1)
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        bp = conv(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """The FID InceptionV3 trunk: normalised NHWC images in [-1, 1] -> pool3 features [B, 2048].

    Fully convolutional, so any input size >= 75 runs, but FID is defined at 299x299 (use
    `preprocess`, or `inception_features` which does both).
    """

    dtype: Any = jnp.float32
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, precision=self.precision)
        x = x.astype(self.dtype)
        x = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3", **kw)(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3", **kw)(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3", **kw)(x)
        x = _max_pool_3x3(x, stride=2, pad=0)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1", **kw)(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3", **kw)(x)
        x = _max_pool_3x3(x, stride=2, pad=0)
        x = InceptionA(32, name="Mixed_5b", **kw)(x)
        x = InceptionA(64, name="Mixed_5c", **kw)(x)
        x = InceptionA(64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        x = InceptionC(128, name="Mixed_6b", **kw)(x)
        x = InceptionC(160, name="Mixed_6c", **kw)(x)
        x = InceptionC(160, name="Mixed_6d", **kw)(x)
        x = InceptionC(192, name="Mixed_6e", **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE("avg", name="Mixed_7b", **kw)(x)
        x = InceptionE("max", name="Mixed_7c", **kw)(x)
        # AdaptiveAvgPool2d(1) + flatten; at least float32 even for a bf16 trunk.
        return jnp.mean(x.astype(jnp.promote_types(self.dtype, jnp.float32)), axis=(1, 2))


def dummy_inputs(batch: int = 1) -> tuple[jax.Array]:
    """Positional args for `InceptionV3FID().init` / `jax.eval_shape`."""
    return (jnp.zeros((batch, FID_INPUT_SIZE, FID_INPUT_SIZE, 3), jnp.float32),)


def abstract_variables() -> dict:
    """{'params': ..., 'batch_stats': ...} as ShapeDtypeStructs (no compute, no memory)."""
    return jax.eval_shape(InceptionV3FID().init, jax.random.PRNGKey(0), *dummy_inputs())


def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's bilinear `F.interpolate(align_corners=False, antialias=False)`.

    Why not `jax.image.resize`: it antialiases when downsampling, torch (and so pytorch-fid) does
    not; building the matrix from torch's formula makes both directions match exactly.
    """
    # Rounding as torch's CPU kernel does for float32 images: the scale is a float32 quotient and
    # the source coordinate is rounded once to float32. This reproduces torch's weights exactly
    # (a float64 construction differs by up to 3e-5 for e.g. 320 -> 299).
    f32 = np.float32
    scale = float(f32(in_size) / f32(out_size))
    src = np.maximum(((np.arange(out_size) + 0.5) * scale - 0.5).astype(f32), f32(0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(f32), f32(0), f32(1))
    m = np.zeros((out_size, in_size), f32)
    np.add.at(m, (np.arange(out_size), i0), f32(1) - w1)
    np.add.at(m, (np.arange(out_size), i1), w1)
    return m


def preprocess(images: jax.Array, size: int = FID_INPUT_SIZE) -> jax.Array:
    """NHWC uint8 [0, 255] or float [0, 1] images -> [B, size, size, 3] float32 in [-1, 1]."""
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be NHWC RGB, got shape {x.shape}")
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    h, w = x.shape[1], x.shape[2]
    if h != size:
        x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(_resize_matrix(h, size)), x, precision=_HIGHEST)
    if w != size:
        x = jnp.einsum("ow,bhwc->bhoc", jnp.asarray(_resize_matrix(w, size)), x, precision=_HIGHEST)
    return 2.0 * x - 1.0


def inception_features(
    variables: Mapping, images: jax.Array, dtype: Any = jnp.float32
) -> jax.Array:
    """Pool3 features [B, 2048] (float32) of raw images, as pytorch-fid computes them. Jittable."""
    return InceptionV3FID(dtype=dtype).apply(variables, preprocess(images))


def variables_from_torch(state: Mapping[str, Any], *, source: str = "checkpoint") -> dict:
    """pytorch-fid state dict (torch layout, numpy/torch tensors) -> {'params', 'batch_stats'}.

    Raises convert.CheckpointMismatchError naming every missing, unexpected or misshapen tensor.
    """
    state = {k: np.asarray(v) for k, v in state.items()}
    abstract = abstract_variables()
    is_stat = re.compile(r"\.running_(mean|var)$")
    param_state = {k: v for k, v in state.items() if not is_stat.search(k)}
    stat_state = {k: v for k, v in state.items() if is_stat.search(k)}
    errors: list[str] = []
    out: dict[str, Any] = {}
    for collection, sub_state, kwargs in (
        ("params", param_state, dict(ignore=TORCH_IGNORE)),
        ("batch_stats", stat_state, dict(aliases=_BATCH_STATS_ALIASES)),
    ):
        try:
            out[collection] = convert.torch_to_flax(
                sub_state, abstract[collection], source=f"{source} [{collection}]", **kwargs
            )
        except convert.CheckpointMismatchError as e:
            errors.append(str(e))
    if errors:
        raise convert.CheckpointMismatchError("\n".join(errors))
    return out


def variables_to_torch(variables: Mapping) -> dict[str, np.ndarray]:
    """Inverse of `variables_from_torch`: a pytorch-fid-layout state dict (without `fc`)."""
    leaf_names = {
        ("params", "kernel"): "weight",
        ("params", "scale"): "weight",
        ("params", "bias"): "bias",
        ("batch_stats", "mean"): "running_mean",
        ("batch_stats", "var"): "running_var",
    }
    out: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        tree = variables[collection]
        tree = tree.unfreeze() if hasattr(tree, "unfreeze") else dict(tree)
        for path, value in traverse_util.flatten_dict(tree).items():
            *module, leaf = path
            array = np.asarray(value)
            if leaf == "kernel":
                array = np.transpose(array, (3, 2, 0, 1))  # HWIO -> OIHW
            key = ".".join([*module, leaf_names[(collection, leaf)]])
            out[key] = np.ascontiguousarray(array)
    return out


# Shown when load_inception is handed pytorch-fid's pickle instead of the converted file.
CONVERT_COMMAND = ("python -m dediffusion_jax.evaluation.convert_inception "
                   "--input pt_inception-2015-12-05-6726825d.pth --output inception_fid.safetensors")


class InceptionFeatureExtractor:
    """FID features of image batches with a jitted InceptionV3 (implements fid.FeatureExtractor).

    Accepts NHWC uint8 [0, 255] or float [0, 1] images of any size (resized to 299 like pytorch-fid)
    and returns float32 numpy [B, 2048]. Float images outside [0, 1] raise: the usual mistake is
    passing [-1, 1] decoder output, which silently gives a wrong FID. Smaller batches are
    zero-padded to the largest batch size seen so the last batch of an epoch does not recompile.
    """

    name: str = EXTRACTOR_NAME
    input_size: int = FID_INPUT_SIZE
    feature_dim: int = FEATURE_DIM

    def __init__(self, variables: Mapping, dtype: Any = jnp.float32):
        self.variables = jax.device_put(variables)
        self.dtype = dtype
        self._forward = jax.jit(functools.partial(inception_features, dtype=dtype))
        self._batch = 0

    def __call__(self, images: Any) -> np.ndarray:
        x = images if isinstance(images, jax.Array) else np.asarray(images)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be NHWC RGB, got shape {x.shape}")
        if x.dtype != np.uint8:
            lo, hi = float(x.min()), float(x.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(
                    f"float images must be in [0, 1] (pytorch-fid's convention), got [{lo:.3g}, "
                    f"{hi:.3g}]; map [-1, 1] images with (x + 1) / 2"
                )
        b = x.shape[0]
        self._batch = max(self._batch, b)
        if b < self._batch:
            pad = [(0, self._batch - b)] + [(0, 0)] * 3
            x = jnp.pad(x, pad) if isinstance(x, jax.Array) else np.pad(x, pad)
        return np.asarray(self._forward(self.variables, x))[:b]


def load_inception(path: str | os.PathLike, dtype: Any = jnp.float32) -> InceptionFeatureExtractor:
    """Loads converted FID Inception weights (safetensors only) into a feature extractor."""
    state = weights.read_file(path, convert=CONVERT_COMMAND)
    return InceptionFeatureExtractor(variables_from_torch(state, source=os.fspath(path)), dtype=dtype)
