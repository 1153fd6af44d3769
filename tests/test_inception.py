"""FID InceptionV3: layer names/shapes match pytorch-fid, numeric parity with a torch reference.

pytorch-fid (and torch-fidelity) import torchvision, which does not import beside this torch, so the
reference here is a minimal pure-torch copy of pytorch-fid's network: torchvision's Inception3
blocks (BasicConv2d, InceptionA..E with their exact channel counts and paddings) with the FID
patches (count_include_pad=False average pools, the max pool in Mixed_7c) and `fc` 2048 -> 1008,
so its `state_dict()` has the same keys as `pt_inception-2015-12-05-6726825d.pth`.
Random weights; BatchNorm running stats are calibrated on the test input so activations stay O(1)
through all 94 conv layers and the feature comparison is meaningful.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from torch import nn

from dediffusion_jax.evaluation import convert_inception, fid, inception
from dediffusion_jax.t2i import convert


# ----------------------------------------------------------------------------- torch reference
class TBasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class TInceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = TBasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = TBasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = TBasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = TBasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = TBasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TBasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = TBasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg(x))], 1)


class TInceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = TBasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = TBasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = TBasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TBasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, 3, stride=2)], 1)


class TInceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = TBasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = TBasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = TBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = TBasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = TBasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = TBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = TBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = TBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = TBasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = TBasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class TInceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = TBasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = TBasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = TBasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = TBasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TBasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TBasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class TInceptionE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = TBasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = TBasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = TBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = TBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = TBasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = TBasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = TBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = TBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = TBasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TFIDInception(nn.Module):
    """pytorch-fid's `fid_inception_v3()` + `InceptionV3(output_blocks=[3])` forward."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TBasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = TBasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = TBasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = TBasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = TBasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = TInceptionA(192, 32)
        self.Mixed_5c = TInceptionA(256, 64)
        self.Mixed_5d = TInceptionA(288, 64)
        self.Mixed_6a = TInceptionB(288)
        self.Mixed_6b = TInceptionC(768, 128)
        self.Mixed_6c = TInceptionC(768, 160)
        self.Mixed_6d = TInceptionC(768, 160)
        self.Mixed_6e = TInceptionC(768, 192)
        self.Mixed_7a = TInceptionD(768)
        self.Mixed_7b = TInceptionE(1280, max_pool=False)
        self.Mixed_7c = TInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in the checkpoint, unused for FID

    def forward(self, images01):  # NCHW in [0, 1], as pytorch-fid's InceptionV3.forward
        x = F.interpolate(images01, size=(299, 299), mode="bilinear", align_corners=False)
        return self.trunk(2 * x - 1)

    def trunk(self, x):  # normalised [-1, 1] input -> pool3
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def images_u8():
    return np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)


def _to_torch01(images_u8):
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def torch_reference(images_u8):
    """Random-weight reference with BN stats calibrated (momentum 1) on the test batch."""
    torch.manual_seed(0)
    model = TFIDInception()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.momentum = 1.0
        model.train()
        model(_to_torch01(images_u8))
    return model.eval()


@pytest.fixture(scope="module")
def torch_state(torch_reference):
    return {k: v.numpy() for k, v in torch_reference.state_dict().items()}


@pytest.fixture(scope="module")
def extractor(torch_state):
    return inception.InceptionFeatureExtractor(inception.variables_from_torch(torch_state))


# ----------------------------------------------------------------------------- tests
def test_flax_names_and_shapes_match_the_pytorch_fid_state_dict(torch_state):
    abstract = inception.abstract_variables()
    flax_as_torch = inception.variables_to_torch(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    )
    reference = {
        k: v.shape for k, v in torch_state.items() if not k.endswith("num_batches_tracked")
    }
    assert reference.pop("fc.weight") == (1008, 2048) and reference.pop("fc.bias") == (1008,)
    assert {k: v.shape for k, v in flax_as_torch.items()} == reference
    assert len(reference) == 94 * 5  # 94 BasicConv2d: conv.weight + bn.{weight,bias,running_*}
    assert reference["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert reference["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert reference["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)


def test_state_dict_round_trips_through_flax_variables(torch_state):
    variables = inception.variables_from_torch(torch_state)
    kernel = variables["params"]["Mixed_5b"]["branch5x5_2"]["conv"]["kernel"]
    assert kernel.shape == (5, 5, 48, 64)  # HWIO
    assert variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"].shape == (192,)
    back = inception.variables_to_torch(variables)
    for key, value in back.items():
        np.testing.assert_array_equal(value, torch_state[key], err_msg=key)


def test_wrong_checkpoint_is_rejected_with_key_names(torch_state):
    broken = dict(torch_state)
    del broken["Mixed_6b.branch7x7_2.bn.running_var"]
    broken["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 192, 3, 3), np.float32)
    with pytest.raises(convert.CheckpointMismatchError) as err:
        inception.variables_from_torch(broken)
    assert "Mixed_6b/branch7x7_2/bn/var" in str(err.value)
    assert "Mixed_5b.branch1x1.conv.weight" in str(err.value)


@pytest.mark.parametrize("shape", [(2, 64, 48, 3), (2, 400, 320, 3), (1, 256, 256, 3)])
def test_preprocess_matches_torch_bilinear_resize(shape):
    # Upsampling (COCO at 256 -> 299) and downsampling without antialiasing, as F.interpolate.
    x = np.random.default_rng(1).uniform(size=shape).astype(np.float32)
    ref = F.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
        align_corners=False,
    )
    ref = (2 * ref - 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(inception.preprocess(x)), ref, atol=1e-6)


@pytest.fixture(scope="module")
def reference_features(torch_reference, images_u8):
    """Torch features of the test batch in float32 and float64 (the latter as ground truth)."""
    ref64_model = copy.deepcopy(torch_reference).double()
    with torch.no_grad():
        f32 = torch_reference(_to_torch01(images_u8)).numpy()
        x64 = F.interpolate(
            _to_torch01(images_u8).double(), size=(299, 299), mode="bilinear", align_corners=False
        ) * 2 - 1
        f64 = ref64_model.trunk(x64).numpy()
    return {"float32": f32, "float64": f64, "input64": x64.permute(0, 2, 3, 1).numpy()}


@pytest.mark.parity
def test_network_matches_the_torch_reference_in_float64(torch_state, reference_features):
    # In float64 the two implementations agree to rounding: same names, layouts, paddings, pools.
    ref = reference_features["float64"]
    with jax.enable_x64(True):
        variables = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64), inception.variables_from_torch(torch_state)
        )
        model = inception.InceptionV3FID(dtype=jnp.float64)
        got = np.asarray(jax.jit(model.apply)(variables, reference_features["input64"]))
    assert got.dtype == np.float64 and got.shape == (2, 2048)
    assert ref.std() > 0.1  # BN calibration keeps features O(1) rather than vanishing
    err = np.abs(got - ref).max()
    assert err <= 1e-9, err


@pytest.mark.parity
def test_float32_features_match_the_torch_reference(extractor, images_u8, reference_features):
    got = extractor(images_u8)  # 64x64 uint8 -> resized to 299 inside, as pytorch-fid does
    assert got.shape == (2, inception.FEATURE_DIM) and got.dtype == np.float32
    truth = reference_features["float64"]
    torch32_err = np.abs(reference_features["float32"] - truth).max()
    jax32_err = np.abs(got - truth).max()
    # 94 random conv layers with calibrated BN amplify float32 rounding to ~1e-4..1e-3 in *both*
    # frameworks; JAX must be no less accurate than torch's own float32 forward.
    assert jax32_err <= 2 * torch32_err + 1e-5, (jax32_err, torch32_err)
    assert np.abs(got - reference_features["float32"]).max() <= 1e-3

    # A 299x299 float input in [0, 1] runs the same compiled network (no resize).
    assert extractor(np.full((2, 299, 299, 3), 0.5, np.float32)).shape == (2, 2048)
    # A smaller final batch is padded to the compiled batch size and gives the same features.
    np.testing.assert_allclose(extractor(images_u8[1:]), got[1:], atol=1e-5)


def test_extractor_protocol_and_input_checks(extractor, images_u8):
    assert isinstance(extractor, fid.FeatureExtractor)
    assert (extractor.name, extractor.input_size) == ("inception_v3_fid_pool3", 299)
    # How evaluation uses it: stream image batches into float64 statistics.
    stats = fid.compute_stats(extractor, [images_u8, images_u8[:1]], progress=False)
    assert (stats.n, stats.dim, stats.name) == (3, 2048, "inception_v3_fid_pool3")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extractor(np.full((1, 32, 32, 3), -0.5, np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        extractor(np.zeros((1, 3, 32, 32), np.uint8))


def test_converter_round_trip_and_loading(tmp_path, torch_reference, torch_state):
    pth = tmp_path / "pt_inception-random.pth"
    torch.save(torch_reference.state_dict(), pth)
    out = tmp_path / "inception_fid.safetensors"
    convert_inception.main(["--input", str(pth), "--output", str(out)])

    written = load_file(str(out))
    expected = {
        k: v for k, v in torch_state.items()
        if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))
    }
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)

    loaded = inception.load_inception(out)
    assert loaded.name == inception.EXTRACTOR_NAME
    kernel = loaded.variables["params"]["Conv2d_1a_3x3"]["conv"]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(kernel), torch_state["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0)
    )

    with pytest.raises(ValueError, match="safetensors only.*convert_inception --input"):
        inception.load_inception(pth)


def test_converter_refuses_a_mismatched_checkpoint(tmp_path, torch_reference, capsys):
    state = dict(torch_reference.state_dict())
    del state["Mixed_7b.branch1x1.conv.weight"]
    pth = tmp_path / "broken.pth"
    torch.save(state, pth)
    out = tmp_path / "never_written.safetensors"
    with pytest.raises(convert.CheckpointMismatchError, match="Mixed_7b/branch1x1/conv/kernel"):
        convert_inception.convert(str(pth), str(out))
    # The command says it in one line and exits 2 (a traceback only with --debug).
    assert convert_inception.main(["--input", str(pth), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Mixed_7b/branch1x1/conv/kernel" in err and "Traceback" not in err
    assert not out.exists()
