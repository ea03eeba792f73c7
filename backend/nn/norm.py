"""Normalization layers with torch's parameter names (`weight`, `bias`): GroupNorm (with the
time-conditioned scale/shift and the SiLU fused), LayerNorm, RMSNorm and diffusers' SpatialNorm."""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from backend.nn.activations import silu_
from backend.nn.conv import Conv2d
from backend.nn.core import as_dtype, host_param, is_host, ones_parameter, zeros_parameter
from backend.nn.host import MIN_PARALLEL_ELEMENTS, host_gemm
from backend.nn.sampling import interpolate_nearest, nearest_repeat_factor

# Device path: on CPU MindSpore's broadcasting element-wise kernels are slow while `ops.BatchNorm`
# inference and `ops.BiasAdd` are fast, so the group norms use those.
_bias_add = ops.BiasAdd()  # adds a (C,) vector along axis 1
_batch_norm_ops: dict = {}


def _batch_norm(eps: float):
    if eps not in _batch_norm_ops:
        _batch_norm_ops[eps] = ops.BatchNorm(is_training=False, epsilon=eps)
    return _batch_norm_ops[eps]


# ---------------------------------------------------------------------------------- group norm

def _center_host(rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """rows (R, n) minus their means written to `out`; returns the variances (R,).

    Two passes (center, then square) with blocked sums: as exact as torch's kernel also when a
    group's mean is large against its spread (one float32 sum over a 512x512 group drifts by ~1e-4).
    """
    n = rows.shape[1]
    mean = rows.sum(axis=1, dtype=np.float32) / np.float32(n)  # numpy sums pairwise
    np.subtract(rows, mean[:, None], out=out)
    k = math.gcd(n, 1024)
    blocks = out.reshape(len(out), n // k, k)
    return np.einsum("rmk,rmk->rm", blocks, blocks).sum(axis=1) / np.float32(n)


def _row_sums(x):
    """(R, N) Tensor -> (R,) with the last axis summed in two stages through a matmul.

    A plain ReduceSum over a million float32 values has a relative error near 4e-6; summing
    blocks of `k` with a matmul first keeps it near 1e-7 (torch's group norm is that exact).
    """
    rows, n = x.shape
    k = math.gcd(n, 1024)
    ones = ops.ones((k, 1), x.dtype)
    return ops.matmul(x.reshape(rows, n // k, k), ones).reshape(rows, n // k).sum(-1)


def group_moments(x, num_groups: int):
    """x (B, C, *spatial) -> (x minus its group mean, float32, same shape; group variance (B, G)).
    On the host path the centered array is a fresh one."""
    b = x.shape[0]
    if is_host(x):
        centered = np.empty(x.shape, np.float32)
        var = _center_host(x.reshape(b * num_groups, -1), centered.reshape(b * num_groups, -1))
        return centered, var.reshape(b, num_groups)
    rows = x.astype(ms.float32).reshape(b * num_groups, -1)  # (B*G, C/G*spatial)
    n = rows.shape[1]
    mean = _row_sums(rows) / n  # (B*G,)
    centered = _bias_add(rows.reshape(1, b * num_groups, n), -mean).reshape(b * num_groups, n)
    var = _row_sums(centered * centered) / n
    return centered.reshape(x.shape), var.reshape(b, num_groups)


def _per_channel(stat, channels: int):
    """(B, G) group statistic -> (B, C) with each group's value on its channels."""
    b, g = stat.shape
    if is_host(stat):
        return np.repeat(stat, channels // g, axis=1)
    return ops.broadcast_to(stat.reshape(b, g, 1), (b, g, channels // g)).reshape(b, channels)


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, *, scale=None, shift=None,
               act: bool = False):
    """torch group_norm over x (B, C, *spatial) with optional per-channel weight/bias; then
    `* (1 + scale) + shift` with scale/shift (B, C) if given (a resnet's time conditioning), then
    SiLU if `act`. The normalization, the affine and scale/shift are one multiply-add per channel."""
    if is_host(x):
        return _group_norm_host(x, num_groups, weight, bias, eps, scale, shift, act)
    shape = x.shape
    b, c = shape[0], shape[1]
    centered, var = group_moments(x, num_groups)
    var_c = _per_channel(var, c).reshape(b * c)
    weight = ops.ones((c,), ms.float32) if weight is None else weight.astype(ms.float32)
    bias = ops.zeros((c,), ms.float32) if bias is None else bias.astype(ms.float32)
    if b > 1:
        weight, bias = ops.tile(weight, (b,)), ops.tile(bias, (b,))
    if scale is not None:  # torch: (y * w + b) * (1 + scale) + shift
        factor = 1 + scale.astype(ms.float32).reshape(b * c)
        weight, bias = weight * factor, bias * factor + shift.astype(ms.float32).reshape(b * c)
    # BatchNorm inference with mean 0 and the group variances = (x - mean) * rsqrt(var + eps) * w + b,
    # per channel, in one kernel; the batch is folded into the channel axis.
    y = _batch_norm(eps)(centered.reshape(1, b * c, -1, 1), weight, bias, ops.zeros_like(var_c), var_c)[0]
    y = y.reshape(shape).astype(x.dtype)
    return ops.silu(y) if act else y


def _group_norm_host(x, num_groups, weight, bias, eps, scale, shift, act):
    b, c = x.shape[0], x.shape[1]
    g = num_groups
    weight = np.ones((c,), np.float32) if weight is None else host_param(weight)
    bias = np.zeros((c,), np.float32) if bias is None else host_param(bias)
    out = np.empty(x.shape, np.float32)

    def one_sample(i: int) -> None:
        y = out[i].reshape(g, -1)
        var = _center_host(x[i].reshape(g, -1), y)
        rstd = 1 / np.sqrt(var + np.float32(eps))  # (G,)
        mul = (rstd[:, None] * weight.reshape(g, -1)).reshape(c)
        add = bias
        if scale is not None:  # torch: (y * w + b) * (1 + scale) + shift
            mul = mul * (1 + scale[i])
            add = bias * (1 + scale[i]) + shift[i]
        y = y.reshape(c, -1)
        y *= mul[:, None]
        y += add[:, None]
        if act:
            silu_(y)

    if x.size >= MIN_PARALLEL_ELEMENTS:
        host_gemm().parallel(b, one_sample)
    else:
        for i in range(b):
            one_sample(i)
    return out


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm over (B, C, *spatial): weight/bias per channel. Called with scale/shift
    (B, C) and act, it also applies `* (1 + scale) + shift` and SiLU (see `group_norm`)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels ({num_channels}) must be divisible by num_groups "
                             f"({num_groups})")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = ones_parameter((num_channels,))
            self.bias = zeros_parameter((num_channels,))

    def construct(self, x, scale=None, shift=None, act: bool = False):
        return group_norm(x, self.num_groups, self.weight if self.affine else None,
                          self.bias if self.affine else None, self.eps, scale=scale, shift=shift, act=act)


class SpatialNorm(nn.Cell):
    """diffusers SpatialNorm (MoVQ): group_norm(f) * conv_y(zq) + conv_b(zq), zq resized (nearest)
    to f's size; SiLU fused when `act`.

    Nearest resizing only picks pixels, so it commutes with the 1x1 convs and the group norm's
    per-channel affine: both factor maps are formed at zq's resolution and resized last,
    out = (f - mean) * up(rstd * w * conv_y(zq)) + up(b * conv_y(zq) + conv_b(zq)).
    """

    # diffusers hard-codes SpatialNorm's group norm: 32 groups, eps 1e-6
    GROUPS = 32
    EPS = 1e-6

    def __init__(self, f_channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = GroupNorm(self.GROUPS, f_channels, eps=self.EPS)
        self.conv_y = Conv2d(zq_channels, f_channels, 1)
        self.conv_b = Conv2d(zq_channels, f_channels, 1)

    def construct(self, f, zq, act: bool = False):
        if is_host(f):
            return self._host_forward(f, zq, act)
        b, c, h, w = f.shape
        centered, var = group_moments(f, self.GROUPS)  # (B, C, H, W), (B, G)
        rstd = _per_channel(ops.rsqrt(var + self.norm_layer.eps), c)  # (B, C)
        gamma = self.norm_layer.weight.astype(ms.float32).reshape(1, c, 1, 1)
        beta = self.norm_layer.bias.astype(ms.float32).reshape(1, c, 1, 1)
        y = self.conv_y(zq).astype(ms.float32)  # (B, C, zh, zw)
        scale = y * (rstd.reshape(b, c, 1, 1) * gamma)
        shift = y * beta + self.conv_b(zq).astype(ms.float32)
        out = centered * interpolate_nearest(scale, (h, w)) + interpolate_nearest(shift, (h, w))
        out = out.astype(f.dtype)
        return ops.silu(out) if act else out

    def _host_forward(self, f, zq, act):
        b, c, h, w = f.shape
        zh, zw = zq.shape[2], zq.shape[3]
        centered, var = group_moments(f, self.GROUPS)  # fresh (B, C, H, W), (B, G)
        rstd = _per_channel(1 / np.sqrt(var + np.float32(self.norm_layer.eps)), c)  # (B, C)
        y = self.conv_y(zq)  # (B, C, zh, zw)
        scale = y * (rstd * host_param(self.norm_layer.weight))[:, :, None, None]
        shift = self.conv_b(zq)
        shift += y * host_param(self.norm_layer.bias)[None, :, None, None]
        fh, fw = nearest_repeat_factor(zh, h), nearest_repeat_factor(zw, w)
        if fh is None or fw is None:
            centered *= interpolate_nearest(scale, (h, w))
            centered += interpolate_nearest(shift, (h, w))
        else:
            # Repeat columns only; the fh repeated rows come from broadcasting along a whole
            # row, so no full-size factor map is ever written.
            rows = centered.reshape(b, c, zh, fh, w)
            rows *= interpolate_nearest(scale, (zh, w))[:, :, :, None, :]
            rows += interpolate_nearest(shift, (zh, w))[:, :, :, None, :]
        return silu_(centered) if act else centered


# ---------------------------------------------------------------------------------- layer norms

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

    def construct(self, x):
        if is_host(x):
            return layer_norm(x, self.weight, self.bias, self.eps)
        weight = self.weight
        if weight is None:
            weight = ops.ones((self.normalized_shape,), x.dtype)
        bias = self.bias
        if bias is None:
            bias = ops.zeros((self.normalized_shape,), x.dtype)
        return layer_norm(x, weight, bias, self.eps)


_layer_norm_ops: dict = {}


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """torch layer_norm over the last axis. On the host path weight and bias may be None and the
    statistics are float32, two-pass; the device path needs both (ops.LayerNorm)."""
    if is_host(x):
        y = x - x.mean(axis=-1, keepdims=True)
        var = np.einsum("...i,...i->...", y, y)[..., None] / np.float32(x.shape[-1])
        y *= 1 / np.sqrt(var + np.float32(eps))
        if weight is not None:
            y *= host_param(weight)
        if bias is not None:
            y += host_param(bias)
        return y
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
        return as_dtype(self.weight, x.dtype) * (x * ops.rsqrt(variance + self.eps))
