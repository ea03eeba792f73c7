"""backend/nn, the layer library: each layer on both paths (numpy arrays on the host path, Tensors
on the device path) against MindSpore's reference ops, numpy formulas or torch's outputs; the host
kernels (backend/nn/host.py)."""
import math
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

from backend.nn import (Conv2d, ConvTranspose2d, Downsample2D, GELU, GroupNorm, LayerNorm, Linear, Model,
                        TimestepEmbedding, Upsample2D, attention, avg_pool_2x, get_activation, get_timestep_embedding,
                        group_norm, interpolate_nearest, layer_norm, ones_parameter, run_model,
                        scaled_dot_product_attention, silu, silu_, torch_nearest_indices, upsample_nearest_2x)
from backend.nn.host import conv2d_host, host_gemm, host_matmul, in_parallel_share, split_batch
from tests.conftest import as_numpy, assert_close

FIXTURES = Path(__file__).parent / "fixtures"
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def both_paths(*arrays):
    """The same inputs for the host path (numpy) and the device path (Tensors)."""
    return [arrays, tuple(Tensor(a) if isinstance(a, np.ndarray) else a for a in arrays)]


def reference_conv(x, weight, bias, stride, padding):
    y = ops.conv2d(Tensor(x), Tensor(weight), None, stride=stride, pad_mode="pad", padding=padding).asnumpy()
    return y if bias is None else y + bias[None, :, None, None]


# ---------------------------------------------------------------------------------- host kernels

def test_host_matmul_matches_numpy():
    """The oneDNN sgemm wrapper: plain, transposed and strided views, broadcasting, split products."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((300, 200), dtype=np.float32)
    b = rng.standard_normal((200, 500), dtype=np.float32)
    bt = np.ascontiguousarray(b.T)
    stack = rng.standard_normal((3, 200, 40), dtype=np.float32)
    cases = [(a, b), (a, bt.T), (np.ascontiguousarray(a.T).T, b), (a[:, ::2], b[::2]), (a, stack),
             (stack.transpose(0, 2, 1), a.T[None]), (a[:1], b[:, :1]), (a[:5, :0], b[:0, :3])]
    for left, right in cases:
        expected = np.matmul(left.astype(np.float64), right.astype(np.float64))
        got = host_matmul(left, right)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    out = np.empty((2, 300, 500), np.float32)
    host_matmul(a, np.stack([b, b]), out=out[:, :, :])
    np.testing.assert_allclose(out[1], a.astype(np.float64) @ b, rtol=0, atol=1e-4)


def test_host_matmul_into_a_transposed_out_is_the_transposed_product():
    """`out` given as a transposed view gets out.T = b.T @ a.T: the same sgemm call as writing
    the transpose, so bit-identical to it."""
    a, b = randn(37, 19), randn(19, 23)
    out = np.empty((23, 37), np.float32)
    host_matmul(a, b, out=out.T)
    np.testing.assert_array_equal(out, host_matmul(b.T, a.T))
    np.testing.assert_allclose(out.T, a @ b, rtol=1e-5, atol=1e-5)


def test_parallel_shares_are_serial_and_nested_calls_do_not_deadlock():
    """Inside a share of parallel(), host_matmul runs unsplit on its thread and a nested
    parallel() is a plain loop (the one-worker pool would otherwise wait on itself)."""
    import threading

    a, b = randn(64, 300), randn(300, 2000)  # large enough to be split outside a share
    expected = host_matmul(a, b)
    seen, results = [], [None] * 4

    def inner(j):
        seen.append((threading.get_ident(), in_parallel_share()))

    def outer(i):
        assert in_parallel_share()
        host_gemm().parallel(3, inner)
        results[i] = host_matmul(a, b)

    assert not in_parallel_share()
    host_gemm().parallel(4, outer)
    assert not in_parallel_share()
    assert len(seen) == 12 and all(flag for _, flag in seen)
    for r in results:
        np.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-4)


def test_split_batch_concatenates_ranges_in_order():
    threads = host_gemm().threads
    calls = []

    def forward(start, stop):
        calls.append((start, stop, in_parallel_share()))
        rows = np.arange(start, stop, dtype=np.float32)
        return rows[:, None] * np.ones((1, 3), np.float32), rows

    for batch in (threads, threads + 1, 5):
        calls.clear()
        out = split_batch(batch, forward)
        if threads == 1:
            assert out is None
            continue
        first, second = out
        np.testing.assert_array_equal(second, np.arange(batch, dtype=np.float32))
        np.testing.assert_array_equal(first[:, 0], np.arange(batch, dtype=np.float32))
        assert sorted((s, e) for s, e, _ in calls)[0][0] == 0 and all(flag for *_, flag in calls)
        assert len(calls) == threads  # one contiguous range per core
    if threads > 1:
        assert split_batch(threads - 1, forward) is None  # fewer samples than cores: per-layer split
    single = split_batch(1, lambda s, e: np.zeros((e - s, 2), np.float32))
    assert single is None


def test_unet_batch_split_matches_one_sample_at_a_time():
    """A model's entry (run_model) hands whole samples to the cores: each sample's output equals
    running that sample alone."""
    from backend.models.unet_2d_condition import UNet2DConditionModel
    from backend.weights import load_model

    model = load_model(UNet2DConditionModel, FIXTURES / "unet_tiny_image")
    in_channels = model.config.in_channels
    embed_dim = model.config.encoder_hid_dim
    sample, embeds = randn(3, in_channels, 8, 8), randn(3, embed_dim)
    steps = np.array([10, 500, 900], np.int64)
    together = model(sample, steps, added_cond_kwargs={"image_embeds": embeds})
    for i in range(3):
        alone = model(sample[i:i + 1], steps[i:i + 1], added_cond_kwargs={"image_embeds": embeds[i:i + 1]})
        assert_close(together[i:i + 1], alone, 1e-5)


@pytest.mark.parametrize("host", [True, False], ids=["cpu-numpy-path", "mindspore-ops-path"])
def test_run_model_converts_float_and_integer_inputs_for_each_path(host):
    class Tiny(Model):
        def __init__(self):
            super().__init__()
            self.weight = ones_parameter((2,), ms.float16)

    model = Tiny()
    model.cpu_numpy_path = host
    seen = []
    inputs = (np.ones((2, 3), np.float64), {"ids": Tensor(np.arange(3, dtype=np.int64))}, [np.arange(2)], 7, None)
    run_model(model, lambda *args: seen.extend(args), *inputs, split_samples=False)
    floats, ids, positions, number, nothing = seen[0], seen[1]["ids"], seen[2][0], seen[3], seen[4]
    if host:  # numpy throughout, floats as float32
        assert floats.dtype == np.float32 and ids.dtype == np.int64 and positions.dtype == np.arange(2).dtype
    else:  # floats in the parameters' dtype, integers as int32 Tensors for the gathers
        assert floats.dtype == ms.float16 and ids.dtype == ms.int32 and positions.dtype == ms.int32
        np.testing.assert_array_equal(ids.asnumpy(), [0, 1, 2])
    assert (number, nothing) == (7, None)


# ---------------------------------------------------------------------------------- convolutions

@pytest.mark.parametrize("kernel,stride,padding,size", [(3, 1, 1, (9, 7)), (3, 2, 1, (9, 7)), (1, 1, 0, (5, 6)),
                                                         (3, 2, 0, (8, 8)), (4, 2, 1, (8, 10))])
def test_conv2d_matches_mindspore_conv(kernel, stride, padding, size):
    conv = Conv2d(6, 5, kernel, stride=stride, padding=padding)
    conv.weight.set_data(Tensor(randn(5, 6, kernel, kernel)))
    conv.bias.set_data(Tensor(randn(5)))
    x = randn(2, 6, *size)
    reference = reference_conv(x, conv.weight.asnumpy(), conv.bias.asnumpy(), stride, padding)
    for (inp,) in both_paths(x):
        assert_close(conv(inp), reference, 2e-5)


def assert_same_sums(banded: np.ndarray, whole: np.ndarray) -> None:
    """The same products, summed in bands: equal up to the order oneDNN's sgemm sums them in. Its
    AVX-512 kernels give bit-identical results for any number of columns; its AVX2 kernels (an AMD
    EPYC here) round a column of a 36-column product differently from the same column of a 99-column
    one (1 ulp: 2.9e-6 on values ~10). A band that missed or shifted a row would be off by O(1)."""
    assert banded.shape == whole.shape
    assert_close(banded, whole, 1e-6 * max(1.0, float(np.abs(whole).max())))


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_conv2d_with_few_outputs_sums_taps_on_the_output_side(padding):
    """kh * kw * O <= C, stride 1: the taps-on-the-output-side scheme, in bands, any padding."""
    import backend.nn.host as host

    x, weight, bias = randn(2, 32, 11, 9), randn(3, 32, 3, 3) / np.float32(17), randn(3)  # outputs O(1)
    reference = reference_conv(x, weight, bias, 1, padding)
    assert_close(conv2d_host(x, weight, bias, 1, padding), reference, 2e-5)
    assert_close(conv2d_host(x, weight, None, 1, padding), reference - bias[None, :, None, None], 2e-5)
    whole = conv2d_host(x, weight, bias, 1, padding)
    banded = host.FEW_OUTPUTS_BAND_COLUMNS
    try:
        host.FEW_OUTPUTS_BAND_COLUMNS = 2 * (9 + 2 * padding)  # two output rows per band
        assert_same_sums(conv2d_host(x, weight, bias, 1, padding), whole)
    finally:
        host.FEW_OUTPUTS_BAND_COLUMNS = banded


def test_conv2d_native_kernel_matches_the_host_kernel(monkeypatch):
    """The branch GPU and Ascend run (ops.conv2d on Tensors), taken on CPU by pretending to be
    elsewhere: on CPU a Tensor's convolution otherwise goes to the host kernel too."""
    import backend.nn.conv as conv

    layer = Conv2d(4, 6, 3, stride=2, padding=1)
    layer.weight.set_data(Tensor(randn(6, 4, 3, 3)))
    layer.bias.set_data(Tensor(randn(6)))
    x = randn(2, 4, 7, 9)
    host = layer(x)
    monkeypatch.setattr(conv, "on_cpu", lambda: False)
    assert_close(layer(Tensor(x)), host, 2e-5)


def test_conv2d_host_batch_smaller_and_larger_than_cores():
    weight, bias = randn(4, 3, 3, 3), randn(4)
    for batch in (1, 2, 5):
        x = randn(batch, 3, 6, 6)
        assert_close(conv2d_host(x, weight, bias, 1, 1), reference_conv(x, weight, bias, 1, 1), 2e-5)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_conv2d_host_bands_match_one_product(batch, monkeypatch):
    """Columns built and multiplied in bands of output rows give the same result as one product."""
    import backend.nn.host as host

    x, weight, bias = randn(batch, 5, 11, 9), randn(6, 5, 3, 3), randn(6)
    whole = conv2d_host(x, weight, bias, 1, 1)
    strided = conv2d_host(x, weight, bias, 2, 1)
    monkeypatch.setattr(host, "COLUMNS_BAND_BYTES", 4 * 45 * 9 * 2)  # two output rows per band
    assert_same_sums(conv2d_host(x, weight, bias, 1, 1), whole)
    assert_same_sums(conv2d_host(x, weight, bias, 2, 1), strided)
    assert_close(whole, reference_conv(x, weight, bias, 1, 1), 2e-5)


def test_half_precision_conv_returns_half():
    conv = Conv2d(3, 2, 3, padding=1)
    conv.weight.set_dtype(ms.float16)
    conv.weight.set_data(Tensor(randn(2, 3, 3, 3).astype(np.float16)))
    conv.bias.set_dtype(ms.float16)
    conv.bias.set_data(Tensor(randn(2).astype(np.float16)))
    out = conv(Tensor(randn(1, 3, 4, 4).astype(np.float16)))
    assert out.dtype == ms.float16 and out.shape == (1, 2, 4, 4)


def test_conv_transpose_2x2_matches_the_scatter_definition():
    """torch ConvTranspose2d(kernel 2, stride 2): out[o, 2i+p, 2j+q] = sum_c x[c, i, j] w[c, o, p, q] + b[o]."""
    conv = ConvTranspose2d(3, 4, 2, stride=2)
    weight, bias, x = randn(3, 4, 2, 2), randn(4), randn(2, 3, 5, 6)
    conv.weight.set_data(Tensor(weight))
    conv.bias.set_data(Tensor(bias))
    expected = np.einsum("bcij,copq->boipjq", x, weight).reshape(2, 4, 10, 12) + bias[None, :, None, None]
    for (inp,) in both_paths(x):
        assert_close(conv(inp), expected, 1e-5)
    with pytest.raises(ValueError, match="stride == kernel_size"):
        ConvTranspose2d(3, 4, 3, stride=2)


# ---------------------------------------------------------------------------------- linear, norms

def test_linear_and_its_channels_first_form():
    lin = Linear(8, 3)
    lin.weight.set_data(Tensor(randn(3, 8)))
    lin.bias.set_data(Tensor(randn(3)))
    w, b = lin.weight.asnumpy(), lin.bias.asnumpy()
    x = randn(2, 5, 8)
    for (inp,) in both_paths(x):
        assert_close(lin(inp), x @ w.T + b, 1e-5)
        assert_close(lin.channels_first(inp.swapaxes(1, 2)), (x @ w.T + b).swapaxes(1, 2), 1e-5)


def test_layer_norm_both_paths():
    ln = LayerNorm(8, eps=1e-5)
    ln.weight.set_data(Tensor(randn(8)))
    ln.bias.set_data(Tensor(randn(8)))
    x = randn(3, 4, 8) + 5
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-5) * ln.weight.asnumpy() + ln.bias.asnumpy()
    for (inp,) in both_paths(x):
        assert_close(ln(inp), expected, 1e-5)
    assert_close(layer_norm(x, None, None), (x - mean) / np.sqrt(var + 1e-5), 1e-5)


def group_norm_reference(x, groups, weight, bias, eps, scale=None, shift=None, act=False):
    g = x.reshape(x.shape[0], groups, -1).astype(np.float64)
    y = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)).reshape(x.shape)
    per_channel = (1, -1) + (1,) * (x.ndim - 2)
    y = y * weight.reshape(per_channel) + bias.reshape(per_channel)
    if scale is not None:
        y = y * (1 + scale.reshape(scale.shape + (1,) * (x.ndim - 2))) + shift.reshape(shift.shape + (1,) * (x.ndim - 2))
    return y / (1 + np.exp(-y)) if act else y


@pytest.mark.parametrize("shape", [(2, 6, 4, 5), (3, 6, 7)])
def test_group_norm_with_fused_scale_shift_and_silu(shape):
    norm = GroupNorm(2, 6, eps=1e-6)
    weight, bias = randn(6), randn(6)
    norm.weight.set_data(Tensor(weight))
    norm.bias.set_data(Tensor(bias))
    x = randn(*shape) + 3  # a mean large against the spread: the two-pass statistics keep it exact
    scale, shift = randn(shape[0], 6), randn(shape[0], 6)
    for inp, s, t in both_paths(x, scale, shift):
        assert_close(norm(inp), group_norm_reference(x, 2, weight, bias, 1e-6), 1e-5)
        assert_close(norm(inp, s, t, act=True), group_norm_reference(x, 2, weight, bias, 1e-6, scale, shift, True),
                     1e-5)
        assert_close(group_norm(inp, 3), group_norm_reference(x, 3, np.ones(6), np.zeros(6), 1e-5), 1e-5)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        GroupNorm(4, 6)


def test_silu_and_its_in_place_form():
    x = randn(3, 5) * 40  # exp(-x) overflows for x << 0: the result is -0, as torch's
    expected = x / (1 + np.exp(-x.astype(np.float64)))
    for (inp,) in both_paths(x):
        assert_close(silu(inp), expected, 1e-5)
    y = x.copy()
    assert silu_(y) is y
    assert_close(y, expected, 1e-5)
    before = x.copy()
    GroupNorm(1, 5)(x, act=True)  # the norm's SiLU runs in place on its own output only
    np.testing.assert_array_equal(x, before)


def test_get_activation_takes_transformers_and_diffusers_names():
    x = randn(3, 7).astype(np.float64) * 3
    erf = np.vectorize(math.erf)
    tanh_gelu = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    silu_x = x / (1 + np.exp(-x))
    expected = {"gelu": 0.5 * x * (1 + erf(x / math.sqrt(2))), "gelu_new": tanh_gelu, "gelu_pytorch_tanh": tanh_gelu,
                "quick_gelu": x / (1 + np.exp(-1.702 * x)), "relu": np.maximum(x, 0), "silu": silu_x,
                "swish": silu_x, "mish": x * np.tanh(np.log1p(np.exp(x)))}
    for name, values in expected.items():
        for (inp,) in both_paths(x.astype(np.float32)):
            assert_close(get_activation(name)(inp), values, 1e-5)
    assert get_activation(None) is None
    with pytest.raises(ValueError, match=r"'tanh' is not supported; use one of \['gelu', 'gelu_new'"):
        get_activation("tanh")


def random_linears(cell):
    """Random weights for every Linear in `cell`; returns {name: numpy value}."""
    values = {}
    for name, param in cell.parameters_and_names():
        param.set_data(Tensor(randn(*param.shape)))
        values[name] = param.asnumpy()
    return values


def test_gelu_projection_and_timestep_embedding_with_out_dim():
    erf = np.vectorize(math.erf)
    x = randn(2, 6)
    layer = GELU(6, 10)
    w = random_linears(layer)
    h = x @ w["proj.weight"].T + w["proj.bias"]
    for (inp,) in both_paths(x):
        assert_close(layer(inp), 0.5 * h * (1 + erf(h / math.sqrt(2))), 1e-5)

    # the prior's time MLP: in_channels -> time_embed_dim -> out_dim, diffusers' activation names
    embedding = TimestepEmbedding(6, 16, act_fn="relu", out_dim=4, post_act_fn="silu")
    w = random_linears(embedding)
    h = np.maximum(x @ w["linear_1.weight"].T + w["linear_1.bias"], 0) @ w["linear_2.weight"].T + w["linear_2.bias"]
    for (inp,) in both_paths(x):
        assert_close(embedding(inp), h / (1 + np.exp(-h)), 1e-5)
    assert tuple(TimestepEmbedding(6, 16).linear_2.weight.shape) == (16, 16)  # out_dim defaults to time_embed_dim


@pytest.mark.parametrize("host", [True, False])
def test_spatial_norm_fractional_ratio(host):
    """SpatialNorm over a feature map 1.25x the latent size uses torch's nearest rule (the MoVQ
    fixture's decoder.conv_norm_out against diffusers' output)."""
    from backend.models.vq_model import VQModel
    from backend.weights import load_model

    norm = load_model(VQModel, FIXTURES / "movq_tiny").decoder.conv_norm_out
    ref = np.load(FIXTURES / "movq_tiny" / "reference.npz")
    f, zq = ref["spatial_norm_f"], ref["spatial_norm_zq"]
    out = norm(f, zq) if host else norm(Tensor(f), Tensor(zq))
    assert isinstance(out, np.ndarray) == host
    assert_close(out, ref["spatial_norm_out"], 1e-4)


# ---------------------------------------------------------------------------------- attention

def test_attention_matches_softmax_formula():
    q, k, v = randn(2, 5, 4), randn(2, 7, 4), randn(2, 7, 3)
    mask = np.zeros((2, 5, 7), np.float32)
    mask[:, :, -2:] = -1e9
    scores = q @ k.transpose(0, 2, 1) / 2.0 + mask
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for args in both_paths(q, k, v, mask):
        assert_close(scaled_dot_product_attention(*args), probs @ v, 1e-5)
        channels_first = scaled_dot_product_attention(*(a.swapaxes(-1, -2) for a in args[:3]), args[3],
                                                      channels_first=True)
        assert_close(channels_first, (probs @ v).swapaxes(-1, -2), 1e-5)


@pytest.mark.parametrize("host", [True, False])
def test_attention_in_blocks_equals_the_whole_score_tensor(host, monkeypatch):
    """Large score tensors are computed in blocks of heads or of query rows: the same result to
    float32 rounding (sgemm blocks a 7-row product differently from a 96-row one)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 96, 3, 8)).astype(np.float32)      # (B, N, h, d)
    q = x.transpose(0, 2, 1, 3)                                      # strided view, as the models pass it
    k = rng.standard_normal((2, 3, 40, 8)).astype(np.float32)
    v = rng.standard_normal((2, 3, 40, 8)).astype(np.float32)
    masks = (None, np.where(rng.random((2, 1, 1, 40)) < 0.2, -1e9, 0).astype(np.float32),
             rng.standard_normal((2, 1, 96, 40)).astype(np.float32))
    for mask in masks:
        args = (q, k, v, mask) if host else (Tensor(q), Tensor(k), Tensor(v), None if mask is None else Tensor(mask))
        whole = as_numpy(scaled_dot_product_attention(*args))
        for limit in (2 * 96 * 40, 7 * 40):  # two heads per block; 7 query rows per block
            monkeypatch.setattr(attention, "SCORE_BLOCK_ELEMENTS", limit)
            blocks = as_numpy(scaled_dot_product_attention(*args))
            monkeypatch.undo()
            assert blocks.shape == whole.shape == (2, 3, 96, 8)
            assert np.abs(blocks - whole).max() <= 1e-6


# ---------------------------------------------------------------------------------- sampling

def test_resample_ops_match_torch_definitions():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 6), dtype=np.float32)
    for (inp,) in both_paths(x):
        assert_close(upsample_nearest_2x(inp), x.repeat(2, axis=2).repeat(2, axis=3), 0.0)
        assert_close(avg_pool_2x(inp), x.reshape(2, 3, 2, 2, 3, 2).mean(axis=(3, 5)), 1e-6)


def test_upsample_and_downsample_layers():
    """diffusers Upsample2D (nearest 2x, conv padding 1) and Downsample2D (pad right/bottom, conv
    stride 2), on both paths."""
    x = randn(2, 4, 5, 6)
    up, down = Upsample2D(4), Downsample2D(4)
    for layer in (up, down):
        layer.conv.weight.set_data(Tensor(randn(4, 4, 3, 3)))
        layer.conv.bias.set_data(Tensor(randn(4)))
    w_up, b_up = up.conv.weight.asnumpy(), up.conv.bias.asnumpy()
    w_down, b_down = down.conv.weight.asnumpy(), down.conv.bias.asnumpy()
    expected_up = reference_conv(x.repeat(2, axis=2).repeat(2, axis=3), w_up, b_up, 1, 1)
    expected_down = reference_conv(np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1))), w_down, b_down, 2, 0)
    for (inp,) in both_paths(x):
        assert_close(up(inp), expected_up, 2e-5)
        assert_close(down(inp), expected_down, 2e-5)


@pytest.mark.parametrize("host", [True, False])
def test_interpolate_nearest_matches_torch(host):
    ref = np.load(FIXTURES / "movq_tiny" / "reference.npz")
    keys = [k for k in ref.files if k.startswith("nearest_in_")]
    assert len(keys) == 6
    for key in keys:
        expected = ref[key.replace("nearest_in_", "nearest_out_")]
        source = ref[key] if host else Tensor(ref[key])
        assert_close(interpolate_nearest(source, expected.shape[2:]), expected, 0.0)


def test_torch_nearest_indices_rule():
    np.testing.assert_array_equal(torch_nearest_indices(4, 8), [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(torch_nearest_indices(4, 4), [0, 1, 2, 3])
    # floor(i * 5/12) in float32
    np.testing.assert_array_equal(torch_nearest_indices(5, 12), [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4])


# ---------------------------------------------------------------------------------- embeddings

def test_timestep_embedding_matches_diffusers():
    ref = np.load(FIXTURES / "unet_tiny_timestep_embedding.npz")
    for dim in (16, 32, 384):
        ours = get_timestep_embedding(ref["timesteps"], dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert ours.dtype == np.float32 and ours.shape == ref[f"emb_{dim}"].shape
        # torch's float32 exp is off by one unit in the last place for a few frequencies
        assert np.abs(ours - ref[f"emb_{dim}"]).max() <= 5e-5
