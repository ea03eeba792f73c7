"""Small portable layers whose parameter names match PyTorch checkpoints.

Every layer here is built from `mindspore.ops` primitives that have CPU, GPU and Ascend
kernels (never `mindspore.mint`, whose ops are unregistered on CPU). Parameters are
named like torch's (`weight`, `bias`), so a model whose attribute paths follow the
checkpoint loads with the identity map (see backend/weights.py).

Parameters start as zeros: real values always come from a checkpoint, and zeros cost
nothing to compute at build time (random init of a 1.2B-parameter UNet takes minutes).
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

from backend.nn.conv import conv2d


def zeros_parameter(shape, dtype=ms.float32) -> Parameter:
    return Parameter(initializer("zeros", tuple(shape), dtype))


def ones_parameter(shape, dtype=ms.float32) -> Parameter:
    return Parameter(initializer("ones", tuple(shape), dtype))


class Linear(nn.Cell):
    """torch.nn.Linear: weight (out, in), bias (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = zeros_parameter((out_features, in_features))
        self.bias = zeros_parameter((out_features,)) if bias else None

    def construct(self, x):
        shape = x.shape
        y = ops.matmul(x.reshape(-1, shape[-1]), self.weight.T)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Conv2d(nn.Cell):
    """torch.nn.Conv2d (groups=1, dilation=1): weight (out, in, kh, kw), bias (out,).

    Runs through `backend.nn.conv.conv2d`, which picks a matmul fast path on CPU.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.weight = zeros_parameter((out_channels, in_channels, kernel_size, kernel_size))
        self.bias = zeros_parameter((out_channels,)) if bias else None

    def construct(self, x):
        return conv2d(x, self.weight, self.bias, self.stride, self.padding)


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm over (B, C, *spatial): weight/bias per channel."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = ones_parameter((num_channels,))
            self.bias = zeros_parameter((num_channels,))

    def construct(self, x):
        return group_norm(x, self.num_groups, self.weight if self.affine else None,
                          self.bias if self.affine else None, self.eps)


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    shape = x.shape
    b, c = shape[0], shape[1]
    # Statistics in float32 even for half-precision activations (as torch's CPU kernel does).
    xg = x.reshape(b, num_groups, -1).astype(ms.float32)
    mean = xg.mean(axis=-1, keep_dims=True)
    centered = xg - mean
    var = (centered * centered).mean(axis=-1, keep_dims=True)
    y = (centered * ops.rsqrt(var + eps)).reshape(shape).astype(x.dtype)
    if weight is not None:
        bshape = (1, c) + (1,) * (len(shape) - 2)
        y = y * weight.reshape(bshape) + bias.reshape(bshape)
    return y


class LayerNorm(nn.Cell):
    """torch.nn.LayerNorm over the last dimension."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True):
        super().__init__()
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = ones_parameter((normalized_shape,))
            self.bias = zeros_parameter((normalized_shape,)) if bias else None
        else:
            self.weight = None
            self.bias = None
        self._ones = None

    def construct(self, x):
        weight = self.weight
        if weight is None:
            weight = ops.ones((self.normalized_shape,), x.dtype)
        bias = self.bias
        if bias is None:
            bias = ops.zeros((self.normalized_shape,), x.dtype)
        return layer_norm(x, weight, bias, self.eps)


_layer_norm_ops: dict = {}


def layer_norm(x, weight, bias, eps: float = 1e-5):
    op = _layer_norm_ops.get(eps)
    if op is None:
        op = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        _layer_norm_ops[eps] = op
    return op(x, weight, bias)[0]


class Embedding(nn.Cell):
    """torch.nn.Embedding: weight (num_embeddings, dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = zeros_parameter((num_embeddings, embedding_dim))

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


def silu(x):
    return ops.silu(x)


def gelu(x, approximate: str = "none"):
    return ops.gelu(x, approximate=approximate)


def scaled_dot_product_attention(q, k, v, mask=None, scale: float | None = None):
    """softmax(q k^T * scale + mask) v over (..., L, D) tensors.

    `mask` is additive (0 keeps, large negative drops) and broadcasts to (..., Lq, Lk).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = ops.matmul(q * scale, k.swapaxes(-1, -2))
    if mask is not None:
        scores = scores + mask
    probs = ops.softmax(scores.astype(ms.float32), axis=-1).astype(v.dtype)
    return ops.matmul(probs, v)
