"""Bilinear and bicubic resizing as torch's `F.interpolate(x, size=..., mode="bilinear" | "bicubic")`
computes it on CPU, for (B, C, H, W) numpy arrays (host path) or Tensors (device path).

The tap positions and weights are those of aten/src/ATen/native/UpSample.h (`area_pixel_compute_scale`,
`area_pixel_compute_source_index`, `guard_index_and_lambda`, `get_cubic_upsample_coefficients`), in
float32 arithmetic as torch does them for float32 tensors:

    scale = (in - 1) / (out - 1)                 with align_corners (0 when out == 1)
            in / out                             without
    src   = scale * i                            with align_corners
            scale * (i + 0.5) - 0.5              without (bilinear clamps it at 0, bicubic does not)
    i0    = min(floor(src), in - 1),  t = clamp(src - i0, 0, 1)
    bilinear: taps i0, min(i0 + 1, in - 1) with weights 1 - t, t (same size: the identity)
    bicubic:  taps i0 - 1 .. i0 + 2, clamped to [0, in - 1], weights of Keys' cubic convolution
              with A = -0.75 at distances 1 + t, t, 1 - t, 2 - t

The two axes are resized one after the other, the last (W) first, then H: torch's kernel sums the
W taps of each H tap, then the H taps (aten/src/ATen/native/cpu/UpSampleKernel.cpp `Interpolate`),
so the sums are the same ones in the same order.

`F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)` is `size=(2H, 2W)` here:
with align_corners the scale is (in - 1) / (out - 1) whatever the factor.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from backend.nn.core import is_host
from backend.nn.host import MIN_PARALLEL_ELEMENTS, host_gemm

# Keys' cubic convolution parameter as torch (and OpenCV) use it.
CUBIC_A = np.float32(-0.75)


def _source_positions(in_size: int, out_size: int, align_corners: bool, cubic: bool) -> np.ndarray:
    """Source coordinate of every output index, float32 (torch's area_pixel_compute_source_index)."""
    i = np.arange(out_size, dtype=np.float32)
    if align_corners:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
        return scale * i
    scale = np.float32(in_size) / np.float32(out_size)
    # torch's build contracts scale * (i + 0.5) - 0.5 into one fused multiply-add (measured: its weights
    # match this to the last bit where the two roundings differ by up to 4 ulp): the product of two
    # float32 numbers is exact in float64, so only the subtraction rounds before the final float32
    src = (np.float64(scale) * (i + np.float32(0.5)).astype(np.float64) - 0.5).astype(np.float32)
    return src if cubic else np.maximum(src, np.float32(0))


def _index_and_lambda(src: np.ndarray, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's guard_index_and_lambda: the tap left of each source position and the fraction past it."""
    index = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - index.astype(np.float32), np.float32(0), np.float32(1))
    return index, lam


def linear_taps(in_size: int, out_size: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray]:
    """(indices (2, out) int64, weights (2, out) float32) of torch's linear interpolation."""
    if in_size == out_size:  # torch copies (compute_source_index_and_lambda)
        index = np.arange(out_size, dtype=np.int64)
        return np.stack([index, index]), np.stack([np.ones(out_size, np.float32), np.zeros(out_size, np.float32)])
    index, lam = _index_and_lambda(_source_positions(in_size, out_size, align_corners, cubic=False), in_size)
    upper = index + (index < in_size - 1)
    return np.stack([index, upper]), np.stack([np.float32(1) - lam, lam])


def cubic_taps(in_size: int, out_size: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray]:
    """(indices (4, out) int64, weights (4, out) float32) of torch's bicubic interpolation."""
    index, t = _index_and_lambda(_source_positions(in_size, out_size, align_corners, cubic=True), in_size)
    a = CUBIC_A
    one = np.float32(1)

    def near(x):  # |x| <= 1: ((A + 2) x - (A + 3)) x^2 + 1
        return ((a + 2) * x - (a + 3)) * x * x + one

    def far(x):  # 1 < |x| < 2: ((A x - 5 A) x + 8 A) x - 4 A
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)]).astype(np.float32)
    taps = np.stack([np.clip(index - 1 + j, 0, in_size - 1) for j in range(4)])
    return taps, weights


def _resize_axis(x, axis: int, taps: np.ndarray, weights: np.ndarray):
    """sum_j weights[j] * x.take(taps[j], axis), in torch's order (j = 0 first)."""
    shape = [1] * len(x.shape)
    shape[axis] = taps.shape[1]
    if is_host(x):
        out = x.take(taps[0], axis=axis)
        out *= weights[0].reshape(shape)
        for j in range(1, len(taps)):
            term = x.take(taps[j], axis=axis)
            term *= weights[j].reshape(shape)
            out += term
        return out
    out = None
    for j in range(len(taps)):
        w = Tensor(weights[j].reshape(shape))
        term = ops.gather(x, Tensor(taps[j].astype(np.int32)), axis) * w
        out = term if out is None else out + term
    return out


# Output elements per share of a host resize: a few channels at a time, whose input and output stay in the
# CPU cache between the two passes, spread over the cores. Measured (bilinear, medians of 9, a busy machine):
# 64 channels 148x148 -> 296x296 17.4 ms in one piece, 8.3 ms in shares; 32 channels 296x296 -> 518x518
# 27.0 ms and 15.6 ms; outputs identical.
SHARE_ELEMENTS = 1 << 18


def _interpolate_host(x: np.ndarray, size: tuple[int, int], taps_w, taps_h) -> np.ndarray:
    b, c, h, w = x.shape
    maps = x.reshape(b * c, 1, h, w)
    out = np.empty((b * c, 1) + size, np.float32)
    per_share = max(1, SHARE_ELEMENTS // (size[0] * size[1]))
    starts = list(range(0, b * c, per_share))

    def one(i: int) -> None:
        part = maps[starts[i]:starts[i] + per_share]
        out[starts[i]:starts[i] + per_share] = _resize_axis(_resize_axis(part, 3, *taps_w), 2, *taps_h)

    if out.size >= MIN_PARALLEL_ELEMENTS:
        host_gemm().parallel(len(starts), one)
    else:
        for i in range(len(starts)):
            one(i)
    return out.reshape(b, c, *size)


def _interpolate(x, size: tuple[int, int], taps_fn, align_corners: bool):
    if len(x.shape) != 4:
        raise ValueError(f"interpolation takes (B, C, H, W); got shape {tuple(x.shape)}")
    h, w = x.shape[2], x.shape[3]
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"interpolation size must be positive; got {(out_h, out_w)}")
    if is_host(x):
        return _interpolate_host(x if x.dtype == np.float32 else x.astype(np.float32), (out_h, out_w),
                                 taps_fn(w, out_w, align_corners), taps_fn(h, out_h, align_corners))
    # half-precision Tensors are resized in float32 (torch's opmath; and CPU's Gather has no bfloat16)
    dtype = x.dtype
    x = x if dtype == ms.float32 else x.astype(ms.float32)
    x = _resize_axis(x, 3, *taps_fn(w, out_w, align_corners))
    x = _resize_axis(x, 2, *taps_fn(h, out_h, align_corners))
    return x if dtype == ms.float32 else x.astype(dtype)


def interpolate_bilinear(x, size: tuple[int, int], align_corners: bool):
    """torch `F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)`, (B, C, H, W)."""
    return _interpolate(x, size, linear_taps, align_corners)


def interpolate_bicubic(x, size: tuple[int, int], align_corners: bool = False):
    """torch `F.interpolate(x, size=size, mode="bicubic", align_corners=align_corners)`, (B, C, H, W);
    like torch, no clamping of the result (bicubic overshoots near edges)."""
    return _interpolate(x, size, cubic_taps, align_corners)


__all__ = ["CUBIC_A", "cubic_taps", "interpolate_bicubic", "interpolate_bilinear", "linear_taps"]
