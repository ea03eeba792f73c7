"""Resampling: nearest up-sampling (2x and torch's rule for any size), 2x average pooling, and
diffusers' Upsample2D / Downsample2D (models/upsampling.py, downsampling.py) with a conv."""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops

from backend.nn.conv import Conv2d
from backend.nn.core import host_param, host_weight, is_host
from backend.nn.host import conv2d_host


def upsample_nearest_2x(x):
    """F.interpolate(x, scale_factor=2, mode="nearest"): each pixel repeated 2x2. (B, C, 2H, 2W)."""
    b, c, h, w = x.shape
    if is_host(x):
        return np.broadcast_to(x[:, :, :, None, :, None], (b, c, h, 2, w, 2)).reshape(b, c, 2 * h, 2 * w)
    x = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2))
    return x.reshape(b, c, 2 * h, 2 * w)


def avg_pool_2x(x):
    """F.avg_pool2d(x, 2, 2) (floor mode: a trailing odd row/column is dropped). (B, C, H/2, W/2)."""
    b, c, h, w = x.shape
    h2, w2 = h // 2, w // 2
    if is_host(x):
        # the window summed in torch's order, then divided by 4
        out = x[:, :, 0:2 * h2:2, 0:2 * w2:2] + x[:, :, 0:2 * h2:2, 1:2 * w2:2]
        out += x[:, :, 1:2 * h2:2, 0:2 * w2:2]
        out += x[:, :, 1:2 * h2:2, 1:2 * w2:2]
        out *= np.float32(0.25)
        return out
    if h != 2 * h2 or w != 2 * w2:
        x = x[:, :, : 2 * h2, : 2 * w2]
    return x.reshape(b, c, h2, 2, w2, 2).mean(axis=(3, 5))


def torch_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output index in torch's `F.interpolate(mode="nearest", size=...)`.

    aten/src/ATen/native/UpSample.h `nearest_idx`: identity for equal sizes, `i >> 1` for
    exact doubling, else min(floor(i * float32(in / out)), in - 1) in float32 arithmetic.
    """
    i = np.arange(out_size, dtype=np.int64)
    if out_size == in_size:
        return i
    if out_size == 2 * in_size:
        return i >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(i.astype(np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def nearest_repeat_factor(in_size: int, out_size: int) -> int | None:
    """f when torch's nearest rule maps output i to input i // f (each input repeated f times),
    else None."""
    if out_size % in_size:
        return None
    factor = out_size // in_size
    exact = np.array_equal(torch_nearest_indices(in_size, out_size), np.arange(out_size) // factor)
    return factor if exact else None


_index_cache: dict = {}


def _nearest_index(in_size: int, out_size: int) -> Tensor:
    key = (in_size, out_size)
    if key not in _index_cache:
        _index_cache[key] = Tensor(torch_nearest_indices(in_size, out_size).astype(np.int32))
    return _index_cache[key]


def interpolate_nearest(x, size: tuple[int, int]):
    """torch `F.interpolate(x, size=size, mode="nearest")` for (B, C, H, W).

    Two gathers (rows, then columns): on CPU ~5x faster than broadcast_to + contiguous or
    ResizeNearestNeighbor for (1, 128, 64, 64) -> 512x512.
    """
    h, w = x.shape[2], x.shape[3]
    out_h, out_w = size
    if (out_h, out_w) == (h, w):
        return x
    if is_host(x):
        if out_h != h:
            x = x.take(torch_nearest_indices(h, out_h), axis=2)
        return x if out_w == w else x.take(torch_nearest_indices(w, out_w), axis=3)
    return ops.gather(ops.gather(x, _nearest_index(h, out_h), 2), _nearest_index(w, out_w), 3)


class Upsample2D(nn.Cell):
    """diffusers Upsample2D(use_conv=True): nearest 2x, then a 3x3 conv (padding 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def construct(self, x):
        if not is_host(x):
            return self.conv(upsample_nearest_2x(x))
        # Each pixel written four times straight into the zero-padded buffer the conv reads: one
        # copy instead of up-sampling, then padding.
        b, c, h, w = x.shape
        padded = np.zeros((b, c, 2 * h + 2, 2 * w + 2), np.float32)
        for dy in (1, 2):
            for dx in (1, 2):
                padded[:, :, dy:dy + 2 * h:2, dx:dx + 2 * w:2] = x
        bias = None if self.conv.bias is None else host_param(self.conv.bias)
        return conv2d_host(padded, host_weight(self.conv.weight), bias, 1, 0)


class Downsample2D(nn.Cell):
    """diffusers Downsample2D(use_conv=True, padding=0): pad right and bottom by one, then a 3x3
    stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def construct(self, x):
        if is_host(x):
            return self.conv(np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1))))
        return self.conv(ops.pad(x, (0, 1, 0, 1)))
