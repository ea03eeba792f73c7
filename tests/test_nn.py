"""backend.nn layers against MindSpore's reference ops and numpy formulas."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

from backend.nn import Conv2d, GroupNorm, LayerNorm, Linear, scaled_dot_product_attention
from backend.nn.host import conv2d_host, host_matmul

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kernel,stride,padding,size", [(3, 1, 1, (9, 7)), (3, 2, 1, (9, 7)), (1, 1, 0, (5, 6)),
                                                         (3, 2, 0, (8, 8)), (4, 2, 1, (8, 10))])
def test_conv2d_cpu_fast_path_matches_mindspore_conv(kernel, stride, padding, size):
    conv = Conv2d(6, 5, kernel, stride=stride, padding=padding)
    conv.weight.set_data(Tensor(randn(5, 6, kernel, kernel)))
    conv.bias.set_data(Tensor(randn(5)))
    x = Tensor(randn(2, 6, *size))
    reference = ops.conv2d(x, conv.weight, None, stride=stride, pad_mode="pad", padding=padding)
    reference = reference + conv.bias.reshape(1, -1, 1, 1)
    out = conv(x)
    assert out.shape == reference.shape
    np.testing.assert_allclose(out.asnumpy(), reference.asnumpy(), atol=2e-5)


def test_conv2d_host_batch_smaller_and_larger_than_cores():
    weight, bias = randn(4, 3, 3, 3), randn(4)
    for batch in (1, 2, 5):
        x = randn(batch, 3, 6, 6)
        ref = ops.conv2d(Tensor(x), Tensor(weight), None, pad_mode="pad", padding=1).asnumpy() + bias[None, :, None, None]
        np.testing.assert_allclose(conv2d_host(x, weight, bias, 1, 1), ref, atol=2e-5)


def test_host_matmul_transposed_views():
    a, b = randn(37, 19), randn(23, 19)
    np.testing.assert_allclose(host_matmul(a, b.T), a @ b.T, rtol=1e-5, atol=1e-5)


def test_group_norm_matches_formula():
    norm = GroupNorm(2, 6, eps=1e-6)
    norm.weight.set_data(Tensor(randn(6)))
    norm.bias.set_data(Tensor(randn(6)))
    x = randn(2, 6, 4, 5)
    g = x.reshape(2, 2, -1).astype(np.float64)
    expected = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)).reshape(x.shape)
    expected = expected * norm.weight.asnumpy()[None, :, None, None] + norm.bias.asnumpy()[None, :, None, None]
    np.testing.assert_allclose(norm(Tensor(x)).asnumpy(), expected, atol=1e-5)


def test_layer_norm_and_linear():
    ln = LayerNorm(8, eps=1e-5)
    ln.weight.set_data(Tensor(randn(8)))
    x = randn(3, 4, 8)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-5) * ln.weight.asnumpy()
    np.testing.assert_allclose(ln(Tensor(x)).asnumpy(), expected, atol=1e-5)
    lin = Linear(8, 3)
    lin.weight.set_data(Tensor(randn(3, 8)))
    lin.bias.set_data(Tensor(randn(3)))
    np.testing.assert_allclose(lin(Tensor(x)).asnumpy(), x @ lin.weight.asnumpy().T + lin.bias.asnumpy(), atol=1e-5)


def test_attention_matches_softmax_formula():
    q, k, v = randn(2, 5, 4), randn(2, 7, 4), randn(2, 7, 3)
    mask = np.zeros((2, 5, 7), np.float32)
    mask[:, :, -2:] = -1e9
    scores = q @ k.transpose(0, 2, 1) / 2.0 + mask
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask))
    np.testing.assert_allclose(out.asnumpy(), probs @ v, atol=1e-5)


def test_half_precision_conv_returns_half():
    conv = Conv2d(3, 2, 3, padding=1)
    conv.weight.set_dtype(ms.float16)
    conv.weight.set_data(Tensor(randn(2, 3, 3, 3).astype(np.float16)))
    conv.bias.set_dtype(ms.float16)
    conv.bias.set_data(Tensor(randn(2).astype(np.float16)))
    out = conv(Tensor(randn(1, 3, 4, 4).astype(np.float16)))
    assert out.dtype == ms.float16 and out.shape == (1, 2, 4, 4)


def test_parallel_shares_are_serial_and_nested_calls_do_not_deadlock():
    """Inside a share of parallel(), host_matmul runs unsplit on its thread and a nested
    parallel() is a plain loop (the one-worker pool would otherwise wait on itself)."""
    import threading

    from backend.nn.host import host_gemm, in_parallel_share

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
    from backend.nn.host import host_gemm, in_parallel_share, split_batch

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
    """The UNet hands whole samples to the cores (split_batch): each sample's output equals
    running that sample alone."""
    from pathlib import Path

    from backend.models.unet_2d_condition import UNet2DConditionModel
    from backend.weights import load_model

    model = load_model(UNet2DConditionModel, Path(__file__).parent / "fixtures" / "unet_tiny_image")
    in_channels = model.config.in_channels
    embed_dim = model.config.encoder_hid_dim
    sample, embeds = randn(3, in_channels, 8, 8), randn(3, embed_dim)
    steps = np.array([10, 500, 900], np.int64)
    together = model(Tensor(sample), Tensor(steps), added_cond_kwargs={"image_embeds": Tensor(embeds)}).asnumpy()
    for i in range(3):
        alone = model(Tensor(sample[i:i + 1]), Tensor(steps[i:i + 1]),
                      added_cond_kwargs={"image_embeds": Tensor(embeds[i:i + 1])}).asnumpy()
        np.testing.assert_allclose(together[i:i + 1], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_conv2d_host_bands_match_one_product(batch, monkeypatch):
    """Columns built and multiplied in bands of output rows give the same result as one product."""
    import backend.nn.host as host

    x, weight, bias = randn(batch, 5, 11, 9), randn(6, 5, 3, 3), randn(6)
    whole = conv2d_host(x, weight, bias, 1, 1)
    strided = conv2d_host(x, weight, bias, 2, 1)
    monkeypatch.setattr(host, "COLUMNS_BAND_BYTES", 4 * 45 * 9 * 2)  # two output rows per band
    np.testing.assert_array_equal(conv2d_host(x, weight, bias, 1, 1), whole)
    np.testing.assert_array_equal(conv2d_host(x, weight, bias, 2, 1), strided)
    ref = ops.conv2d(Tensor(x), Tensor(weight), None, pad_mode="pad", padding=1).asnumpy() + bias[None, :, None, None]
    np.testing.assert_allclose(whole, ref, atol=2e-5)


def test_host_attention_in_blocks_equals_the_whole_score_tensor(monkeypatch):
    """Large score tensors are computed per (batch, head) and per block of query rows: the same
    result to float32 rounding (sgemm blocks a 7-row product differently from a 96-row one)."""
    from backend.nn import layers

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 96, 3, 8)).astype(np.float32)      # (B, N, h, d)
    q = x.transpose(0, 2, 1, 3)                                      # strided view, as the models pass it
    k = rng.standard_normal((2, 3, 40, 8)).astype(np.float32)
    v = rng.standard_normal((2, 3, 40, 8)).astype(np.float32)
    for mask in (None, np.where(rng.random((2, 1, 1, 40)) < 0.2, -1e9, 0).astype(np.float32),
                 rng.standard_normal((2, 1, 96, 40)).astype(np.float32)):
        whole = layers.scaled_dot_product_attention(q, k, v, mask)
        monkeypatch.setattr(layers, "MAX_SCORE_ELEMENTS", 7 * 40)   # 7 query rows per block
        blocks = layers.scaled_dot_product_attention(q, k, v, mask)
        monkeypatch.undo()
        assert blocks.shape == whole.shape == (2, 3, 96, 8)
        assert np.abs(blocks - whole).max() <= 1e-6
