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
