"""Parity of backend/models/vq_model.py (MoVQ) with diffusers 0.35.2 VQModel.

Fixtures come from tools/fixtures/make_movq.py (tiny random-weight models saved by diffusers,
with diffusers' outputs on fixed inputs).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor

from backend.models import vq_model
from backend.models.vq_model import VQModel
from backend.nn import attention
from backend.weights import load_model
from tests.conftest import as_numpy, assert_close

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = Path("/work/shared/reference-configs")
if not CONFIGS.exists():
    CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference-configs"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def spatial():
    return load_model(VQModel, FIXTURES / "movq_tiny"), np.load(FIXTURES / "movq_tiny" / "reference.npz")


@pytest.fixture(scope="module")
def group():
    return (load_model(VQModel, FIXTURES / "movq_tiny_group"),
            np.load(FIXTURES / "movq_tiny_group" / "reference.npz"))


@pytest.fixture(params=[True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
def host(request, spatial, group):
    """Runs a test on both execution paths (the models' cpu_numpy_path switch)."""
    for model, _ in (spatial, group):
        model.cpu_numpy_path = request.param
    yield request.param
    for model, _ in (spatial, group):
        model.cpu_numpy_path = True


@pytest.mark.parametrize("name", ["spatial", "group"])
def test_encode_matches_diffusers(name, host, request):
    model, ref = request.getfixturevalue(name)
    latents = model.encode(Tensor(ref["image"]))["latents"]
    assert isinstance(latents, np.ndarray if host else Tensor)
    assert_close(latents, ref["encoded"], TOLERANCE)


@pytest.mark.parametrize("name", ["spatial", "group"])
def test_decode_not_quantized_matches_diffusers(name, host, request):
    model, ref = request.getfixturevalue(name)
    sample = model.decode(Tensor(ref["latents"]), force_not_quantize=True)["sample"]
    assert isinstance(sample, np.ndarray if host else Tensor) and sample.shape == (2, 3, 32, 48)
    assert_close(sample, ref["decoded_not_quantized"], TOLERANCE)


@pytest.mark.parametrize("name", ["spatial", "group"])
def test_decode_quantized_matches_diffusers(name, host, request):
    model, ref = request.getfixturevalue(name)
    latents = ref["latents"] if host else Tensor(ref["latents"])
    quantized, indices = model.quantize(latents)
    np.testing.assert_array_equal(as_numpy(indices), ref["quantized_indices"])
    assert_close(quantized, ref["quantized"], 0.0)
    # diffusers' default is force_not_quantize=False
    assert_close(model.decode(Tensor(ref["latents"]))["sample"], ref["decoded_quantized"], TOLERANCE)
    # quantizing changes the result, so the test above tests the quantizer
    assert np.abs(ref["decoded_quantized"] - ref["decoded_not_quantized"]).max() > 1e-2


def test_roundtrip_matches_diffusers(spatial, host):
    model, ref = spatial
    assert_close(model(Tensor(ref["image"])), ref["roundtrip"], TOLERANCE)


def test_chunked_attention_and_quantizer_match(spatial, host, monkeypatch):
    """The query-block and distance-block loops give the unchunked result (both paths)."""
    model, ref = spatial
    monkeypatch.setattr(attention, "SCORE_BLOCK_ELEMENTS", 384 * 100)  # 16x24 latent: 4 query blocks
    monkeypatch.setattr(vq_model, "MAX_DISTANCE_ELEMENTS", 48 * 300)  # 768 pixels: 3 blocks
    latents = Tensor(ref["latents"][:1])
    assert_close(model.decode(latents)["sample"], ref["decoded_quantized"][:1], TOLERANCE)


def test_vae_scale_factor_and_config(spatial, group):
    model, _ = spatial
    assert model.vae_scale_factor == 2
    assert model.config.block_out_channels == (32, 32)
    assert model.config.norm_type == "spatial"
    assert group[0].config.block_out_channels == (8, 16)


@pytest.mark.parametrize("name", ["kandinsky-2-2-decoder", "kandinsky-2-1", "kandinsky-3"])
def test_published_configs_build(name):
    config = json.loads((CONFIGS / name / "movq.json").read_text())
    start = time.perf_counter()
    model = VQModel.from_config(config)
    params = dict(model.parameters_and_names())
    count = sum(int(np.prod(p.shape)) for p in params.values())
    assert time.perf_counter() - start < 20
    assert model.vae_scale_factor == 8
    assert model.config.block_out_channels == tuple(config["block_out_channels"])
    assert len(params) == 431
    if name == "kandinsky-3":
        # Kandinsky 3 doubles every width; count from diffusers 0.35.2 VQModel(**config) (meta device)
        assert count == 270_669_103
        assert params["decoder.conv_in.weight"].shape == (1024, 4, 3, 3)
    else:
        # kandinsky-2-2-decoder movq/diffusion_pytorch_model.safetensors: 431 tensors, 67,832,495 values
        assert count == 67_832_495
    assert params["quantize.embedding.weight"].shape == (16384, 4)
    assert params["decoder.up_blocks.0.attentions.2.spatial_norm.conv_y.weight"].shape[:2] == (
        config["block_out_channels"][-1], 4)


def test_published_checkpoint_key_names():
    """A few keys exactly as they appear in the published MoVQ checkpoint."""
    config = json.loads((CONFIGS / "kandinsky-2-2-decoder" / "movq.json").read_text())
    names = {name for name, _ in VQModel.from_config(config).parameters_and_names()}
    for key in ("encoder.down_blocks.0.downsamplers.0.conv.weight",
                "encoder.down_blocks.3.attentions.1.group_norm.weight",
                "encoder.mid_block.attentions.0.to_out.0.bias",
                "quant_conv.weight", "post_quant_conv.bias",
                "decoder.mid_block.resnets.0.norm1.norm_layer.weight",
                "decoder.mid_block.resnets.0.norm1.conv_b.bias",
                "decoder.up_blocks.0.upsamplers.0.conv.weight",
                "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
                "decoder.conv_norm_out.conv_y.weight"):
        assert key in names, key
    assert "encoder.down_blocks.3.downsamplers.0.conv.weight" not in names
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in names


@pytest.mark.parametrize("change, message", [
    ({"norm_type": "ada"}, "norm_type"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"down_block_types": ["DownBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
    ({"up_block_types": ["AttnUpDecoderBlock2D"]}, "same length"),
    ({"lookup_from_codebook": True}, "lookup_from_codebook"),
    ({"block_out_channels": [32, 48]}, "multiples of 32"),
])
def test_unsupported_config_values_raise(change, message):
    config = json.loads((FIXTURES / "movq_tiny" / "config.json").read_text())
    config.update(change)
    with pytest.raises(ValueError, match=message):
        VQModel.from_config(config)


def test_bad_input_shape_raises(spatial):
    model, _ = spatial
    with pytest.raises(ValueError, match="latents"):
        model.decode(Tensor(np.zeros((1, 3, 8, 8), np.float32)))
    with pytest.raises(ValueError, match="x must have shape"):
        model.encode(Tensor(np.zeros((1, 4, 8, 8), np.float32)))
