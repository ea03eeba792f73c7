"""Parity of backend/models/t5.py with transformers 4.57.1 T5EncoderModel (Kandinsky 3's text encoder).

Fixture (tools/fixtures/make_t5.py): a tiny gated-silu T5 encoder with random weights, 150 tokens
(beyond max_distance 128, so exact, logarithmic and capped relative-position buckets all occur),
one row padded. Both execution paths (CPU numpy, mindspore.ops) are checked.

Precision: the port computes in float32 whatever the weight dtype. Measured on this fixture (max
abs difference; outputs up to ~4): with fp16 weights, ours differs from an exact float32 run on the
same fp16-rounded weights by 9.7e-4 (the float16 rounding of the output itself), transformers in
float16 by 0.26 (and 0.19 from the fp32-weight output; weight rounding alone moves this random
model by 0.13). With the last `wo` scaled so the residual stream reaches 5.1e5 (far past float16's
65504, the "T5 precision issue"): ours 2.6e-3, finite; transformers-fp16 (wo in fp32 + clamping)
0.18.
"""
import json
from pathlib import Path

import numpy as np
import mindspore as ms
import pytest

from backend.models.t5 import T5EncoderModel, relative_position_bucket
from backend.weights import find_weight_files, iter_safetensors, load_model, load_state_dict, read_config
from tests.conftest import as_numpy, assert_close

FIXTURE = Path(__file__).parent / "fixtures" / "t5_encoder_tiny"
CONFIGS = Path("/work/shared/reference-configs")
if not CONFIGS.is_dir():
    CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference-configs"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def io():
    return np.load(FIXTURE / "io.npz")


def loaded(host: bool, dtype=ms.float32, **config_changes):
    if config_changes:
        model = T5EncoderModel.from_config({**read_config(FIXTURE), **config_changes})
        load_state_dict(model, (kv for f in find_weight_files(FIXTURE) for kv in iter_safetensors(f)),
                        dtype=dtype, source=str(FIXTURE))
        model.set_train(False)
    else:
        model = load_model(T5EncoderModel, FIXTURE, dtype=dtype)
    model.cpu_numpy_path = host
    return model


def out(model, ids, mask=None) -> np.ndarray:
    return as_numpy(model(ids, mask)[0]).astype(np.float32)


@pytest.mark.parametrize("host", [True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
def test_parity_fp32(io, host):
    model = loaded(host)
    for name, mask in (("masked", io["attention_mask"]), ("unmasked", None)):
        assert_close(out(model, io["input_ids"], mask), io[name], TOLERANCE)


# The gated-gelu variant of this random fixture amplifies rounding: multiplying every weight by
# (1 + 6e-8 N(0, 1)) (half a float32 ulp) moves its float64 output by 6.3e-5 to 1.7e-4 (three draws;
# the gated-silu model: 3.3e-5 to 4.3e-5). float32 runs land anywhere in that range of the float64
# output: transformers 3.2e-5 (an AVX-512 CPU, the fixture) and 5.5e-5 (an AVX2 one), ours 4.5e-5 with
# numpy's products and 1.0e-4 with oneDNN's AVX2 sgemm. 1e-4 is below what float32 can promise here.
GATED_GELU_TOLERANCE = 2.5e-4


def test_gated_gelu_variant(io):
    model = loaded(True, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new")
    assert_close(out(model, io["input_ids"], io["attention_mask"]), io["gelu"], GATED_GELU_TOLERANCE)


@pytest.mark.parametrize("host", [True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
def test_fp16_weights_no_precision_loss(io, host):
    """fp16 weights (the published variant) computed in float32: far closer than transformers-fp16."""
    model = loaded(host, dtype=ms.float16)
    ours = out(model, io["input_ids"], io["attention_mask"])
    ours_diff = np.abs(ours - io["rounded_fp32"]).max()
    torch_diff = np.abs(io["torch_fp16"] - io["rounded_fp32"]).max()
    # float32 numpy on the host path (backend/nn/entry.py run_model); the model's dtype on the device path
    assert model(io["input_ids"])[0].dtype == (np.float32 if host else ms.float16)
    assert ours_diff <= 1.5e-3, ours_diff  # at most the float16 rounding of outputs up to ~4
    assert ours_diff < torch_diff / 50, (ours_diff, torch_diff)


def test_fp16_weights_activations_beyond_fp16_range(io):
    """The 'T5 precision issue': a residual stream far past 65504 stays finite and exact."""
    assert io["big_residual_absmax"] > 4 * 65504
    for host in (True, False):
        model = loaded(host, dtype=ms.float16)
        wo = model.encoder.block[-1].layer[1].DenseReluDense.wo.weight
        wo.set_data(ms.Tensor(wo.asnumpy().astype(np.float32) * float(io["big_scale"])).astype(ms.float16))
        ours = out(model, io["input_ids"], io["attention_mask"])
        assert np.isfinite(ours).all()
        assert np.abs(ours - io["big_rounded_fp32"]).max() < 5e-3
    assert np.abs(io["big_torch_fp16"] - io["big_rounded_fp32"]).max() > 0.1  # what float16 compute gives


def test_relative_position_buckets_match_reference_formula():
    # transformers' values for num_buckets 32, max_distance 128 (bidirectional), worked by hand:
    # distances below 8 are exact; 8.. log-spaced up to 15; >= 128 capped; keys after the query +16.
    rel = np.array([0, -1, -7, -8, -12, -16, -127, -128, -1000, 1, 7, 8, 128, 1000])
    expected = np.array([0, 1, 7, 8, 9, 10, 15, 15, 15, 17, 23, 24, 31, 31])
    assert (relative_position_bucket(rel, 32, 128) == expected).all()


def test_real_config_builds_with_transformers_param_count():
    config = json.loads((CONFIGS / "kandinsky-3" / "text_encoder.json").read_text())
    expected = json.loads((FIXTURE / "real_param_count.json").read_text())["T5EncoderModel"]
    from backend.models.t5 import T5Config
    c = T5Config.from_dict(config)
    assert c.is_gated_act and c.dense_act_fn == "silu"
    # Counting shapes of the real 8.7B model would allocate it; count the tiny one against its
    # parameters and the real one by the same formula.
    def count(c):
        inner = c.num_heads * c.d_kv
        ff = (3 if c.is_gated_act else 2) * c.d_model * c.d_ff
        block = 4 * c.d_model * inner + ff + 2 * c.d_model
        return c.vocab_size * c.d_model + c.num_layers * block + c.relative_attention_num_buckets * c.num_heads \
            + c.d_model
    tiny = loaded(True)
    assert sum(int(np.prod(p.shape)) for p in tiny.get_parameters()) == count(tiny.config)
    assert count(c) == expected


def test_bad_config_and_ids():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5EncoderModel.from_config({**read_config(FIXTURE), "feed_forward_proj": "gated-x-y"})
    with pytest.raises(ValueError, match="dense_act_fn"):
        T5EncoderModel.from_config({**read_config(FIXTURE), "dense_act_fn": "swish2"})
    model = loaded(True)
    with pytest.raises(ValueError, match="input_ids"):
        model(np.array([[0, 64]]))
