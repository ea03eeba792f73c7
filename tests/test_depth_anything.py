"""Parity of backend/models/depth_anything.py and backend/nn/interpolate.py with transformers 4.57.1 /
torch 2.13 (fixtures: tools/fixtures/make_depth_anything.py).

The tiny DepthAnythingForDepthEstimation (random weights, layer scales and norms included) on random
pixel values: the trained 4x4 position grid as it is and resized (bicubic) to odd and non-square patch
grids, a side that is not a multiple of 14, batch 2; both execution paths. torch's bilinear and bicubic
interpolation directly. The real Depth-Anything-V2-Small config builds transformers' architecture:
every state-dict key with its shape, 24,785,089 parameters, from the saved config and from the
published file's shorter form.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor

from backend.models.depth_anything import DepthAnythingConfig, DepthAnythingForDepthEstimation
from backend.nn.interpolate import interpolate_bicubic, interpolate_bilinear
from backend.weights import WeightsError, load_model, read_config
from tests.conftest import as_numpy

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "depth_anything_tiny"
SMALL = FIXTURES / "depth_anything_v2_small"
TOLERANCE = 1e-4  # relative to the reference's largest value
MODEL_CASES = ("square", "odd", "tall", "ragged")


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(TINY / "reference.npz"))


@pytest.fixture(scope="module", params=[True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
def model(request):
    """Both the CPU numpy path and the mindspore.ops path (what GPU / Ascend run) are checked."""
    model = load_model(DepthAnythingForDepthEstimation, TINY)
    model.cpu_numpy_path = request.param
    return model


def relative_error(actual, expected) -> float:
    actual, expected = as_numpy(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != reference {expected.shape}"
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("case", MODEL_CASES)
def test_predicted_depth_matches_transformers(model, reference, case):
    pixel_values = reference[f"model_{case}_pixel_values"]
    expected = reference[f"model_{case}_predicted_depth"]
    out = model(pixel_values if model.cpu_numpy_path else Tensor(pixel_values))
    assert isinstance(out, np.ndarray) == model.cpu_numpy_path
    assert relative_error(out, expected) <= TOLERANCE
    assert np.abs(expected).max() > 10 and (expected > 0).mean() > 0.2  # the head's ReLU leaves a real map


def test_cases_cover_the_position_table_and_patch_grids(reference):
    grid = 56 // 14  # the tiny table's trained grid
    shapes = {case: reference[f"model_{case}_pixel_values"].shape for case in MODEL_CASES}
    assert shapes["square"][2:] == (grid * 14, grid * 14)  # the table as it is
    assert shapes["odd"][0] == 2 and shapes["odd"][2] // 14 % 2 == 1  # batch 2; the strided conv rounds up
    assert shapes["tall"][2] // 14 != shapes["tall"][3] // 14  # a non-square grid: the table is resized
    assert shapes["ragged"][2] % 14 and shapes["ragged"][3] % 14  # floored to whole patches
    assert reference["model_ragged_predicted_depth"].shape[1:] == (shapes["ragged"][2] // 14 * 14,
                                                                   shapes["ragged"][3] // 14 * 14)


@pytest.mark.parametrize("host", [True, False], ids=["numpy", "mindspore-ops"])
def test_interpolation_matches_torch(reference, host):
    n = 0
    while f"interp_{n}_x" in reference:
        x = reference[f"interp_{n}_x"]
        size = tuple(int(v) for v in reference[f"interp_{n}_size"])
        array = x if host else Tensor(x)
        for corners in (False, True):
            bicubic = as_numpy(interpolate_bicubic(array, size, align_corners=corners))
            bilinear = as_numpy(interpolate_bilinear(array, size, align_corners=corners))
            np.testing.assert_allclose(bicubic, reference[f"interp_{n}_bicubic_{corners}"], rtol=0, atol=1e-5)
            np.testing.assert_allclose(bilinear, reference[f"interp_{n}_bilinear_{corners}"], rtol=0, atol=1e-6)
        double = as_numpy(interpolate_bilinear(array, (2 * x.shape[2], 2 * x.shape[3]), align_corners=True))
        np.testing.assert_allclose(double, reference[f"interp_{n}_double"], rtol=0, atol=1e-6)
        n += 1
    assert n >= 6


def test_interpolation_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        interpolate_bicubic(np.zeros((3, 4, 4), np.float32), (2, 2))
    with pytest.raises(ValueError, match="positive"):
        interpolate_bilinear(np.zeros((1, 1, 4, 4), np.float32), (0, 2), align_corners=True)


# ------------------------------------------------------------------------------ the real Small config


def published_small_config() -> dict:
    """config.json of depth-anything/Depth-Anything-V2-Small-hf as the Hub stores it: transformers
    writes only the backbone fields that differ from Dinov2Config's defaults."""
    return {
        "architectures": ["DepthAnythingForDepthEstimation"], "backbone": None,
        "backbone_config": {"architectures": ["Dinov2Model"], "hidden_size": 384, "image_size": 518,
                            "model_type": "dinov2", "num_attention_heads": 6,
                            "out_features": ["stage3", "stage6", "stage9", "stage12"], "out_indices": [3, 6, 9, 12],
                            "patch_size": 14, "reshape_hidden_states": False, "torch_dtype": "float32"},
        "fusion_hidden_size": 64, "head_hidden_size": 32, "head_in_index": -1, "initializer_range": 0.02,
        "model_type": "depth_anything", "neck_hidden_sizes": [48, 96, 192, 384], "patch_size": 14,
        "reassemble_factors": [4, 2, 1, 0.5], "reassemble_hidden_size": 384, "torch_dtype": "float32",
        "transformers_version": "4.42.0.dev0", "use_pretrained_backbone": False,
    }


@pytest.mark.parametrize("source", ["saved", "published"])
def test_small_config_builds_transformers_architecture(source):
    config = read_config(SMALL) if source == "saved" else published_small_config()
    model = DepthAnythingForDepthEstimation.from_config(config)
    expected = json.loads((SMALL / "architecture.json").read_text())
    shapes = {name: list(param.shape) for name, param in model.parameters_and_names()}
    assert shapes == expected["state_dict"]
    assert sum(int(np.prod(shape)) for shape in shapes.values()) == expected["parameters"] == 24_785_089
    backbone = model.config.backbone_config
    assert (backbone.hidden_size, backbone.num_hidden_layers, backbone.num_attention_heads, backbone.out_indices,
            backbone.layer_norm_eps, backbone.hidden_act) == (384, 12, 6, [3, 6, 9, 12], 1e-6, "gelu")


def test_default_config_is_transformers_default():
    config = DepthAnythingConfig.from_dict({})
    assert config.backbone_config.out_indices == [9, 10, 11, 12] and config.backbone_config.hidden_size == 384
    assert config.backbone_config.image_size == 518 and config.depth_scale == 1.0


@pytest.mark.parametrize("change, message", [
    ({"depth_estimation_type": "metric"}, "depth_estimation_type"),
    ({"backbone": "facebook/dinov2-small"}, "backbone_config"),
    ({"neck_hidden_sizes": [48, 96, 192]}, "same length"),
    ({"reassemble_factors": [4, 2, 1, 0.3]}, "reassemble_factors"),
    ({"reassemble_hidden_size": 256}, "reassemble_hidden_size"),
    ({"backbone_config": {"model_type": "vit"}}, "DINOv2"),
    ({"backbone_config": {"hidden_size": 384, "num_attention_heads": 5, "out_indices": [3, 6, 9, 12],
                          "reshape_hidden_states": False}}, "divisible"),
    ({"backbone_config": {"hidden_size": 384, "num_attention_heads": 6, "out_indices": [3, 6, 9, 13],
                          "reshape_hidden_states": False}}, "out_indices"),
    ({"backbone_config": {"hidden_size": 384, "num_attention_heads": 6, "out_indices": [3, 6, 9, 12]}},
     "reshape_hidden_states"),
    ({"backbone_config": {"hidden_size": 384, "num_attention_heads": 6, "out_indices": [3, 6, 9, 12],
                          "reshape_hidden_states": False, "use_swiglu_ffn": True}}, "swiglu"),
])
def test_unsupported_configs_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        DepthAnythingConfig.from_dict({**read_config(SMALL), **change})


def test_pixel_values_are_checked(reference):
    model = load_model(DepthAnythingForDepthEstimation, TINY)
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model(np.zeros((1, 4, 28, 28), np.float32))
    with pytest.raises(ValueError, match="at least one 14x14 patch"):
        model(np.zeros((1, 3, 13, 200), np.float32))


def test_strict_loading_names_the_key(tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    tensors = load_file(str(TINY / "model.safetensors"))
    del tensors["backbone.embeddings.mask_token"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="mask_token"):
        load_model(DepthAnythingForDepthEstimation, tmp_path)
