"""Parity of backend/models/unet_2d_condition.py with diffusers 0.35.2.

The fixtures (tools/fixtures/make_unet.py) are tiny diffusers UNet2DConditionModels with the
block types of the Kandinsky 2.1 / 2.2 configs, random weights (norms included), and the
outputs diffusers produced for square and non-square latents, batch 2, with per-sample,
python-int and python-float timesteps.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor

from backend.models.unet_2d_condition import UNet2DConditionModel
from backend.weights import load_model
from tests.conftest import assert_close

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference-configs"
if not CONFIGS.exists():
    CONFIGS = Path("/work/shared/reference-configs")
TOLERANCE = 1e-4
VARIANTS = ["image", "inpaint", "hint", "text_image"]
CASES = ["square", "wide", "tall"]

_models: dict = {}


def tiny_model(variant: str) -> UNet2DConditionModel:
    if variant not in _models:
        _models[variant] = load_model(UNet2DConditionModel, FIXTURES / f"unet_tiny_{variant}")
    return _models[variant]


def case_inputs(ref, case: str):
    kind = str(ref[f"{case}_timestep_kind"])
    timestep = ref[f"{case}_timestep"]
    if kind == "tensor":
        timestep = Tensor(timestep)
    elif kind == "int":
        timestep = int(timestep)
    else:
        timestep = float(timestep)
    added = {"image_embeds": Tensor(ref[f"{case}_image_embeds"])}
    if f"{case}_text_embeds" in ref:
        added["text_embeds"] = Tensor(ref[f"{case}_text_embeds"])
    if f"{case}_hint_u8" in ref:
        added["hint"] = Tensor(ref[f"{case}_hint_u8"].astype(np.float32) / np.float32(255))
    ehs = Tensor(ref[f"{case}_encoder_hidden_states"]) if f"{case}_encoder_hidden_states" in ref else None
    return Tensor(ref[f"{case}_sample"]), timestep, ehs, added


@pytest.mark.parametrize("numpy_path", [True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_diffusers(variant, numpy_path):
    """Both the CPU numpy path (numpy out) and the mindspore.ops path (what GPU / Ascend run,
    Tensors out) match."""
    model = tiny_model(variant)
    ref = np.load(FIXTURES / f"unet_tiny_{variant}" / "reference.npz")
    model.cpu_numpy_path = numpy_path
    try:
        for case in CASES:
            sample, timestep, ehs, added = case_inputs(ref, case)
            out = model(sample, timestep, encoder_hidden_states=ehs, added_cond_kwargs=added)
            assert isinstance(out, np.ndarray if numpy_path else Tensor), case
            assert_close(out, ref[f"{case}_out"], TOLERANCE)
    finally:
        model.cpu_numpy_path = True


def test_numpy_inputs_accepted():
    """Pipelines may pass the conditioning as numpy arrays."""
    model = tiny_model("hint")
    ref = np.load(FIXTURES / "unet_tiny_hint" / "reference.npz")
    sample, timestep, _, added = case_inputs(ref, "square")
    added = {k: v.asnumpy() for k, v in added.items()}
    assert_close(model(sample, timestep, added_cond_kwargs=added), ref["square_out"], TOLERANCE)


def test_timestep_forms_agree():
    """A python int, a 0-d tensor, a (1,) tensor and a (B,) tensor of equal values give one result."""
    model = tiny_model("image")
    ref = np.load(FIXTURES / "unet_tiny_image" / "reference.npz")
    sample, _, _, added = case_inputs(ref, "wide")  # reference made with the python int 500
    expected = ref["wide_out"]
    for timestep in (Tensor(np.array(500, np.int64)), Tensor(np.array([500.0], np.float32)),
                     Tensor(np.array([500, 500], np.int32)), np.int64(500)):
        assert_close(model(sample, timestep, added_cond_kwargs=added), expected, TOLERANCE)


# Parameter counts of diffusers' own UNet2DConditionModel built from each published config.
PUBLISHED_COUNTS = {
    "kandinsky-2-2-decoder": 1_253_057_288,
    "kandinsky-2-2-decoder-inpaint": 1_253_074_568,
    "kandinsky-2-2-controlnet-depth": 1_253_429_212,
    "kandinsky-2-1": 1_228_661_768,
    "kandinsky-2-1-inpaint": 1_228_679_048,
}


@pytest.mark.parametrize("name", list(PUBLISHED_COUNTS))
def test_real_configs_build_with_diffusers_parameter_count(name):
    config = json.loads((CONFIGS / name / "unet.json").read_text())
    model = UNet2DConditionModel.from_config(config)
    count = sum(int(np.prod(p.shape)) for _, p in model.parameters_and_names())
    assert count == PUBLISHED_COUNTS[name]
    assert model.config.in_channels == config["in_channels"] and model.config.out_channels == 8


def test_real_decoder_parameter_names():
    config = json.loads((CONFIGS / "kandinsky-2-2-decoder" / "unet.json").read_text())
    names = {name for name, _ in UNet2DConditionModel.from_config(config).parameters_and_names()}
    assert len(names) == 724
    for key in ("conv_in.weight", "time_embedding.linear_1.weight", "encoder_hid_proj.image_embeds.weight",
                "encoder_hid_proj.norm.weight", "add_embedding.image_proj.weight",
                "down_blocks.1.attentions.0.add_k_proj.weight", "down_blocks.0.downsamplers.0.conv1.weight",
                "mid_block.attentions.0.to_out.0.weight", "up_blocks.2.upsamplers.0.norm1.weight",
                "conv_norm_out.weight", "conv_out.bias"):
        assert key in names, key


def test_unsupported_config_values_raise():
    config = json.loads((FIXTURES / "unet_tiny_image" / "config.json").read_text())
    for key, value in (("class_embed_type", "timestep"), ("mid_block_type", "UNetMidBlock2DCrossAttn"),
                       ("down_block_types", ["CrossAttnDownBlock2D"] * 3), ("addition_embed_type", "text_time"),
                       ("resnet_time_scale_shift", "ada_group"), ("time_embedding_type", "fourier")):
        with pytest.raises(ValueError, match=key if key != "down_block_types" else "down block"):
            UNet2DConditionModel.from_config(dict(config, **{key: value}))


def test_bad_inputs_raise():
    model = tiny_model("image")
    ref = np.load(FIXTURES / "unet_tiny_image" / "reference.npz")
    sample, timestep, _, added = case_inputs(ref, "square")
    with pytest.raises(ValueError, match="image_embeds"):
        model(sample, timestep, added_cond_kwargs={})
    with pytest.raises(ValueError, match="multiples of 4"):
        model(Tensor(np.zeros((2, 4, 6, 8), np.float32)), timestep, added_cond_kwargs=added)
    with pytest.raises(ValueError, match="timestep"):
        model(sample, Tensor(np.array([1, 2, 3])), added_cond_kwargs=added)
    with pytest.raises(ValueError, match="hint"):
        tiny_model("hint")(sample, timestep, added_cond_kwargs=added)
