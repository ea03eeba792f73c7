"""Parity of backend/models/unet_kandinsky3.py with diffusers 0.35.2 Kandinsky3UNet.

Fixture (tools/fixtures/make_unet_kandinsky3.py): a tiny 4-level UNet with 3 layers per block and
random weights, run on non-square latents (16x24 and 24x16), with an int and a (B,) timestep and a
padded and an all-ones text mask. Both execution paths are checked.
"""
import json
from pathlib import Path

import numpy as np
import mindspore as ms
import pytest

from backend.models.unet_kandinsky3 import Kandinsky3UNet
from backend.nn import layers
from backend.weights import load_model, read_config

FIXTURE = Path(__file__).parent / "fixtures" / "unet_k3_tiny"
CONFIGS = Path("/work/shared/reference-configs")
if not CONFIGS.is_dir():
    CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference-configs"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def io():
    return np.load(FIXTURE / "io.npz")


@pytest.fixture(scope="module")
def model():
    return load_model(Kandinsky3UNet, FIXTURE)


@pytest.mark.parametrize("host", [True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
@pytest.mark.parametrize("case", ["wide", "tall"])
def test_parity(model, io, host, case):
    model.cpu_numpy_path = host
    t = io[f"{case}_timestep"]
    out = model(io[f"{case}_sample"], int(t) if t.ndim == 0 else t, io[f"{case}_states"], io[f"{case}_mask"])
    out = out.asnumpy()
    ref = io[f"{case}_out"]
    assert out.shape == ref.shape
    diff = np.abs(out - ref).max()
    assert diff <= TOLERANCE, diff


def test_real_config_builds_with_diffusers_param_count(monkeypatch):
    """The published config (reference-configs/kandinsky-3/unet.json) builds diffusers' 3.06e9
    parameters; shapes are counted without allocating them."""
    sizes = []
    real_zeros, real_ones = layers.zeros_parameter, layers.ones_parameter

    def counting(real):
        def make(shape, dtype=ms.float32):
            sizes.append(int(np.prod(shape)))
            return real((1,), dtype)
        return make

    monkeypatch.setattr(layers, "zeros_parameter", counting(real_zeros))
    monkeypatch.setattr(layers, "ones_parameter", counting(real_ones))
    Kandinsky3UNet.from_config(json.loads((CONFIGS / "kandinsky-3" / "unet.json").read_text()))
    expected = json.loads((FIXTURE / "real_param_count.json").read_text())["Kandinsky3UNet"]
    assert sum(sizes) == expected == 3055348228


def test_bad_inputs_and_config(model, io):
    with pytest.raises(ValueError, match="multiples of 8"):
        model(np.zeros((1, 4, 12, 16), np.float32), 1, io["wide_states"][:1])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(np.zeros((1, 4, 16, 16), np.float32), 1)
    with pytest.raises(ValueError, match="block_out_channels"):
        Kandinsky3UNet.from_config({**read_config(FIXTURE), "block_out_channels": [8, 16]})
    with pytest.raises(ValueError, match="layers_per_block"):
        Kandinsky3UNet.from_config({**read_config(FIXTURE), "layers_per_block": 0})
