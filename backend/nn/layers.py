"""Small portable layers whose parameter names match PyTorch checkpoints.

Every layer here is built from `mindspore.ops` primitives that have CPU, GPU and Ascend
kernels (never `mindspore.mint`, whose ops are unregistered on CPU). Parameters are
named like torch's (`weight`, `bias`), so a model whose attribute paths follow the
checkpoint loads with the identity map (see backend/weights.py).

Parameters start as zeros: real values always come from a checkpoint, and zeros cost
nothing to compute at build time (random init of a 1.2B-parameter UNet takes minutes).

Host path: `Linear`, `LayerNorm`, `Embedding`, `gelu`, `quick_gelu` and
`scaled_dot_product_attention` also take numpy float32 arrays and then compute on the host
(numpy, matrix products through backend/nn/host.py's oneDNN sgemm) and return numpy arrays.
Why: on CPU, MindSpore 2.10's PyNative kernels are slower than the host path (measured on one
full-size prior transformer block, (2, 81, 2048): mindspore.ops 0.54 s, host path see
docs/PERFORMANCE.md). Models choose the path once at their entry (numpy on CPU, Tensors on
GPU/Ascend); a layer never mixes the two.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

from backend.nn.conv import conv2d
from backend.nn.host import MIN_PARALLEL_ELEMENTS, host_gemm, host_matmul


def is_host(x) -> bool:
    """True for a numpy array: the layer computes on the host path."""
    return isinstance(x, np.ndarray)


def host_param(param) -> np.ndarray:
    """float32 numpy view of a parameter (on CPU asnumpy() shares the memory; half-precision
    weights are converted, a copy)."""
    array = param.asnumpy()
    return array if array.dtype == np.float32 else array.astype(np.float32)


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
        if is_host(x):
            # weight.T is a transposed view: sgemm reads it as such, no copy
            y = host_matmul(x.reshape(-1, shape[-1]), host_param(self.weight).T)
            if self.bias is not None:
                y += host_param(self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        # in the input's dtype: T5 keeps half-precision weights and computes in float32
        y = ops.matmul(x.reshape(-1, shape[-1]), _as_dtype(self.weight, x.dtype).T)
        if self.bias is not None:
            y = y + _as_dtype(self.bias, x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def _as_dtype(param, dtype):
    return param if param.dtype == dtype else param.astype(dtype)


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
        if is_host(x):
            return layer_norm_host(x, None if self.weight is None else host_param(self.weight),
                                   None if self.bias is None else host_param(self.bias), self.eps)
        weight = self.weight
        if weight is None:
            weight = ops.ones((self.normalized_shape,), x.dtype)
        bias = self.bias
        if bias is None:
            bias = ops.zeros((self.normalized_shape,), x.dtype)
        return layer_norm(x, weight, bias, self.eps)


def layer_norm_host(x: np.ndarray, weight=None, bias=None, eps: float = 1e-5) -> np.ndarray:
    """torch layer_norm over the last axis, float32, two-pass statistics."""
    y = x - x.mean(axis=-1, keepdims=True)
    var = np.einsum("...i,...i->...", y, y)[..., None] / np.float32(x.shape[-1])
    y *= 1 / np.sqrt(var + np.float32(eps))
    if weight is not None:
        y *= weight
    if bias is not None:
        y += bias
    return y


_layer_norm_ops: dict = {}


def layer_norm(x, weight, bias, eps: float = 1e-5):
    op = _layer_norm_ops.get(eps)
    if op is None:
        op = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        _layer_norm_ops[eps] = op
    return op(x, weight, bias)[0]


class RMSNorm(nn.Cell):
    """T5's layer norm (transformers T5LayerNorm): x / sqrt(mean(x^2) + eps) * weight, no mean
    subtraction, no bias, statistics in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = ones_parameter((hidden_size,))
        self.eps = eps

    def construct(self, x):
        if is_host(x):
            variance = np.einsum("...i,...i->...", x, x)[..., None] / np.float32(x.shape[-1])
            y = x * (1 / np.sqrt(variance + np.float32(self.eps)))
            y *= host_param(self.weight)
            return y
        variance = (x * x).mean(axis=-1, keep_dims=True)
        return _as_dtype(self.weight, x.dtype) * (x * ops.rsqrt(variance + self.eps))


class Embedding(nn.Cell):
    """torch.nn.Embedding: weight (num_embeddings, dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = zeros_parameter((num_embeddings, embedding_dim))

    def construct(self, ids):
        if is_host(ids):  # integer ids as numpy: a host row lookup
            return host_param(self.weight)[ids]
        return ops.gather(self.weight, ids, 0)


def silu(x):
    if is_host(x):
        with np.errstate(over="ignore"):  # exp(-x) -> inf for x << 0 gives x / inf = -0, as torch
            return x / (1 + np.exp(-x))
    return ops.silu(x)


def gelu(x, approximate: str = "none"):
    if is_host(x):
        return _elementwise_host(x, _gelu_erf_chunk if approximate == "none" else _gelu_tanh_chunk)
    return ops.gelu(x, approximate=approximate)


def quick_gelu(x):
    """OpenAI CLIP's gelu approximation x * sigmoid(1.702 x) (transformers `QuickGELUActivation`)."""
    if is_host(x):
        return _elementwise_host(x, _quick_gelu_chunk)
    return x * ops.sigmoid(1.702 * x)


def relu(x):
    return np.maximum(x, np.float32(0)) if is_host(x) else ops.relu(x)


def mish(x):
    if is_host(x):
        return x * np.tanh(np.logaddexp(np.float32(0), x))
    return x * ops.tanh(ops.softplus(x))


def get_timestep_embedding(timesteps: np.ndarray, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1, scale: float = 1,
                           max_period: int = 10000) -> np.ndarray:
    """Sinusoidal embedding (N,) -> (N, embedding_dim) float32, as diffusers computes it
    (models/embeddings.py get_timestep_embedding).

    Every intermediate is rounded to float32 where torch's is. exp/sin/cos are evaluated in
    float64 and rounded: correctly rounded values, which differ from torch's float32 kernels by
    at most one unit in the last place (measured: 4 of 192 frequencies).
    """
    half_dim = embedding_dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half_dim, dtype=np.float32)
    exponent = exponent / np.float32(half_dim - downscale_freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    angles = np.asarray(timesteps).astype(np.float32)[:, None] * freqs[None, :]  # (N, half)
    angles = np.float32(scale) * angles
    emb = np.concatenate([np.sin(angles.astype(np.float64)), np.cos(angles.astype(np.float64))],
                         axis=-1).astype(np.float32)
    if flip_sin_to_cos:
        emb = np.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb


# Element-wise activations on the host run in place over row chunks that stay in the CPU cache,
# spread over the cores (numpy releases the GIL): measured on a (162, 8192) float32 array,
# MindSpore's CPU gelu took 30 ms, one numpy pass per operation over the whole array ~40 ms,
# chunked and split over 2 cores ~10 ms.
_CHUNK_ELEMENTS = 16384


def _elementwise_host(x: np.ndarray, chunk_fn) -> np.ndarray:
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    flat = out.reshape(-1)
    chunks = -(-flat.size // _CHUNK_ELEMENTS)

    def one(i: int) -> None:
        chunk_fn(flat[i * _CHUNK_ELEMENTS:(i + 1) * _CHUNK_ELEMENTS])

    if flat.size >= MIN_PARALLEL_ELEMENTS:
        host_gemm().parallel(chunks, one)
    else:
        for i in range(chunks):
            one(i)
    return out


_SQRT_HALF = np.float32(math.sqrt(0.5))
# Abramowitz & Stegun 7.1.26: erfc(z) = t (a1 + t (a2 + ...)) exp(-z^2), t = 1 / (1 + p z), z >= 0,
# absolute error below 1.5e-7 (float32 rounding adds as much again).
_AS_P = np.float32(0.3275911)
_AS_A = [np.float32(v) for v in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)]


def _gelu_erf_chunk(x: np.ndarray) -> None:
    """In place: x * Phi(x) = x * (1 + erf(x / sqrt 2)) / 2, with erfc of |x| / sqrt 2 from A&S."""
    z = np.abs(x) * _SQRT_HALF
    t = z * _AS_P
    t += 1
    np.reciprocal(t, out=t)
    poly = _AS_A[0] * t
    for a in _AS_A[1:]:
        poly += a
        poly *= t
    np.multiply(z, z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    poly *= z  # erfc(|x| / sqrt 2)
    poly *= np.float32(0.5)  # Phi(-|x|)
    # Phi(x) = 1 - Phi(-|x|) for x >= 0, Phi(-|x|) for x < 0
    np.subtract(1, poly, out=poly, where=x >= 0)
    x *= poly


def _gelu_tanh_chunk(x: np.ndarray) -> None:
    inner = x * x
    inner *= np.float32(0.044715)
    inner += 1
    inner *= x
    inner *= np.float32(math.sqrt(2 / math.pi))
    np.tanh(inner, out=inner)
    inner += 1
    inner *= np.float32(0.5)
    x *= inner


def _quick_gelu_chunk(x: np.ndarray) -> None:
    e = x * np.float32(-1.702)
    with np.errstate(over="ignore"):
        np.exp(e, out=e)
    e += 1
    np.divide(x, e, out=x)


def scaled_dot_product_attention(q, k, v, mask=None, scale: float | None = None):
    """softmax(q k^T * scale + mask) v over (..., L, D) tensors.

    `mask` is additive (0 keeps, large negative drops) and broadcasts to (..., Lq, Lk).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if is_host(q):
        return _attention_host(q, k, v, mask, scale)
    scores = ops.matmul(q * scale, k.swapaxes(-1, -2))
    if mask is not None:
        scores = scores + mask
    probs = ops.softmax(scores.astype(ms.float32), axis=-1).astype(v.dtype)
    return ops.matmul(probs, v)


# Largest block of attention scores materialized at once (float32 elements: 128 MB). Without a
# bound, Kandinsky 3's 64x64-token self-attention at 1024x1024 holds 12 heads x 4096^2 scores
# (805 MB) per sample.
MAX_SCORE_ELEMENTS = 1 << 25


def _attention_host(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask, scale: float) -> np.ndarray:
    """Host scaled_dot_product_attention. q/k/v may be strided views such as
    x.reshape(B, N, h, d).transpose(0, 2, 1, 3): sgemm reads them in place, no copies. Score
    tensors over MAX_SCORE_ELEMENTS are computed one (batch, head) and one block of query rows
    at a time: each row's softmax still sees all its keys, so the result is the same up to float32
    rounding (sgemm blocks smaller products differently; measured <= 1e-6 in tests/test_nn.py)."""
    lead, lq, lk = q.shape[:-2], q.shape[-2], k.shape[-2]
    if math.prod(lead) * lq * lk <= MAX_SCORE_ELEMENTS or k.shape[:-2] != lead or v.shape[:-2] != lead:
        return _attention_block(q, k, v, mask, scale)
    if mask is not None:
        mask = np.broadcast_to(mask, np.broadcast_shapes(mask.shape, (*lead, 1, 1)))
    out = np.empty((*lead, lq, v.shape[-1]), np.float32)
    rows = max(1, MAX_SCORE_ELEMENTS // lk)
    for index in np.ndindex(*lead):
        m = None if mask is None else mask[index]
        for start in range(0, lq, rows):
            block = slice(start, start + rows)
            block_mask = None if m is None else (m if m.shape[-2] == 1 else m[block])
            out[index][block] = _attention_block(q[index][block], k[index], v[index], block_mask, scale)
    return out


def _attention_block(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask, scale: float) -> np.ndarray:
    scores = host_matmul(q, k.swapaxes(-1, -2))  # (..., Lq, Lk)
    scores *= np.float32(scale)
    if mask is not None:
        scores += mask
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return host_matmul(scores, v)
