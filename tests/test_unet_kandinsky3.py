"""Parity of backend/models/unet_kandinsky3.py with diffusers 0.35.2 Kandinsky3UNet.

Fixtures (tools/fixtures/make_unet_kandinsky3.py): a tiny 4-level UNet with 3 layers per block and
random weights, run on non-square latents (16x24 and 24x16), with an int and a (B,) timestep and a
padded and an all-ones text mask; and a 3-level UNet with 2 layers per block whose
time_embedding_dim is not a multiple of attention_head_dim (a config diffusers runs that the
published one does not exercise). Both execution paths are checked.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor

from backend.models.unet_kandinsky3 import Kandinsky3UNet
from backend.weights import load_model, read_config
from tests.conftest import assert_close

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "unet_k3_tiny"
CONFIGS = Path("/work/shared/reference-configs")
if not CONFIGS.is_dir():
    CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference-configs"
TOLERANCE = 1e-4
_models: dict = {}


def tiny_model(name: str) -> Kandinsky3UNet:
    if name not in _models:
        _models[name] = load_model(Kandinsky3UNet, FIXTURES / name)
    return _models[name]


@pytest.mark.parametrize("host", [True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
@pytest.mark.parametrize("name, case", [("unet_k3_tiny", "wide"), ("unet_k3_tiny", "tall"),
                                        ("unet_k3_tiny_3level", "wide")])
def test_parity(name, case, host):
    model = tiny_model(name)
    io = np.load(FIXTURES / name / "io.npz")
    model.cpu_numpy_path = host
    try:
        t = io[f"{case}_timestep"]
        out = model(io[f"{case}_sample"], int(t) if t.ndim == 0 else t, io[f"{case}_states"], io[f"{case}_mask"])
    finally:
        model.cpu_numpy_path = True
    assert isinstance(out, np.ndarray if host else Tensor)
    assert_close(out, io[f"{case}_out"], TOLERANCE)


def test_three_level_config_is_built_as_diffusers_builds_it():
    """With 3 levels diffusers reads the down blocks' attention flags from the start of its 4-tuples
    and the up blocks' from their end: the last up block has attentions, the first down block none."""
    model = tiny_model("unet_k3_tiny_3level")
    assert len(model.down_blocks) == len(model.up_blocks) == 3
    assert not model.down_blocks[0].self_attention and model.down_blocks[0].context_dim is None
    assert model.up_blocks[2].self_attention and model.up_blocks[2].context_dim == 8
    assert model.add_time_condition.attention.heads == 2 and model.add_time_condition.attention.dim_head == 5


def test_real_config_builds_with_diffusers_param_count():
    """The published config (reference-configs/kandinsky-3/unet.json) builds diffusers' 3.06e9
    parameters (MindSpore allocates a parameter's memory only when it is filled)."""
    model = Kandinsky3UNet.from_config(json.loads((CONFIGS / "kandinsky-3" / "unet.json").read_text()))
    count = sum(int(np.prod(p.shape)) for _, p in model.parameters_and_names())
    expected = json.loads((FIXTURE / "real_param_count.json").read_text())["Kandinsky3UNet"]
    assert count == expected == 3055348228


def test_bad_inputs_and_config():
    model = tiny_model("unet_k3_tiny")
    io = np.load(FIXTURE / "io.npz")
    with pytest.raises(ValueError, match="multiples of 8"):
        model(np.zeros((1, 4, 12, 16), np.float32), 1, io["wide_states"][:1])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(np.zeros((1, 4, 16, 16), np.float32), 1)
    config = read_config(FIXTURE)
    # diffusers builds these but its forward fails
    with pytest.raises(ValueError, match="block_out_channels"):
        Kandinsky3UNet.from_config({**config, "block_out_channels": [8, 8, 12, 16, 16]})
    with pytest.raises(ValueError, match="layers_per_block"):
        Kandinsky3UNet.from_config({**config, "layers_per_block": 1})
    # diffusers refuses these
    with pytest.raises(ValueError, match="layers_per_block"):
        Kandinsky3UNet.from_config({**config, "layers_per_block": [3, 3, 3, 3]})
    with pytest.raises(ValueError, match="groups=2.*divisible by num_groups"):
        Kandinsky3UNet.from_config({**config, "block_out_channels": [8, 10, 12, 16]})
    with pytest.raises(ValueError, match="time_embedding_dim=3.*0 heads"):
        Kandinsky3UNet.from_config({**config, "time_embedding_dim": 3})
    # fewer levels are fine, as in diffusers
    assert len(Kandinsky3UNet.from_config({**config, "block_out_channels": [8, 16]}).down_blocks) == 2
