"""MoVQ: the VQ autoencoder that Kandinsky 2.1, 2.2 and 3 decode latents with.

Port of diffusers 0.35.2 `VQModel` (models/autoencoders/vq_model.py) with the pieces it is
built from: `Encoder`, `Decoder`, `VectorQuantizer` (autoencoders/vae.py),
`DownEncoderBlock2D`, `AttnDownEncoderBlock2D`, `UpDecoderBlock2D`, `AttnUpDecoderBlock2D`,
`UNetMidBlock2D` (unets/unet_2d_blocks.py), `ResnetBlock2D` / `ResnetBlockCondNorm2D`
(resnet.py), `Downsample2D` / `Upsample2D`, `Attention` with `AttnProcessor2_0` and
`SpatialNorm` (attention_processor.py). MoVQ itself: Zheng et al. 2022,
https://huggingface.co/papers/2209.09002.

Attribute paths equal the diffusers checkpoint keys (`decoder.up_blocks.0.attentions.1.to_q.weight`).

CPU speed (measured on (1, 128, 512, 512) maps, this 2-core x86-64 machine):
- MindSpore's broadcasting element-wise kernels are slow (a per-channel broadcast multiply
  ~340 ms against ~10 ms for a same-shape multiply; broadcast_to + contiguous ~0.5 s), while
  `ops.BatchNorm` inference and `ops.BiasAdd` take ~25 ms. Group norms are built from those,
  the spatial norm forms its per-pixel factors at latent resolution and resizes them with
  two gathers (~5x faster than broadcast_to or ResizeNearestNeighbor).
- 3x3 convs run on the host through `conv2d_padded_numpy` below (3-4x faster than
  backend/nn/conv.py's im2col at 512x512), and `Upsample2D` writes its repeated pixels
  straight into the padded buffer that conv reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from backend.device import on_cpu
from backend.nn import Conv2d, Embedding, Linear, silu
from backend.nn.conv import conv2d_numpy
from backend.nn.layers import ones_parameter, zeros_parameter

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
UP_BLOCK_TYPES = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")

# diffusers' SpatialNorm hard-codes its group norm: 32 groups, eps 1e-6.
SPATIAL_NORM_GROUPS = 32
SPATIAL_NORM_EPS = 1e-6
# Every norm that Encoder/Decoder build gets resnet_eps=1e-6.
NORM_EPS = 1e-6

# Largest attention score block (query rows x key columns) materialized at once.
MAX_SCORE_ELEMENTS = 1 << 26
# Largest (codebook distance) block materialized at once by the quantizer.
MAX_DISTANCE_ELEMENTS = 1 << 24


@dataclass
class VQModelConfig:
    in_channels: int = 3  # image channels into the encoder
    out_channels: int = 3  # image channels out of the decoder
    down_block_types: tuple = ("DownEncoderBlock2D",)  # encoder blocks, highest resolution first
    up_block_types: tuple = ("UpDecoderBlock2D",)  # decoder blocks, lowest resolution first
    block_out_channels: tuple = (64,)  # channels per resolution level, highest resolution first
    layers_per_block: int = 1  # resnets per encoder block (decoder blocks get one more)
    act_fn: str = "silu"  # only silu/swish is used by the published models
    latent_channels: int = 3  # channels of the encoder output / decoder input
    sample_size: int = 32  # training resolution; unused at inference
    num_vq_embeddings: int = 256  # codebook size
    norm_num_groups: int = 32  # groups of the encoder's and resnet group norms
    vq_embed_dim: int | None = None  # codebook vector size; None means latent_channels
    scaling_factor: float = 0.18215  # latent scale used by some pipelines; unused here
    norm_type: str = "group"  # "spatial" (MoVQ: decoder norms conditioned on the latent) or "group"
    mid_block_add_attention: bool = True  # attention between the two mid-block resnets
    lookup_from_codebook: bool = False  # decode(force_not_quantize=True) treats input as indices
    force_upcast: bool = False  # fp16 upcast hint for pipelines; unused here

    @classmethod
    def from_dict(cls, config: dict) -> "VQModelConfig":
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def validate(self) -> None:
        levels = len(self.block_out_channels)
        if levels == 0:
            raise ValueError("block_out_channels must name at least one level")
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError(f"down_block_types ({len(self.down_block_types)}), up_block_types "
                             f"({len(self.up_block_types)}) and block_out_channels ({levels}) "
                             "must have the same length")
        for name in self.down_block_types:
            if name not in DOWN_BLOCK_TYPES:
                raise ValueError(f"down_block_types: {name!r} is not supported; use {DOWN_BLOCK_TYPES}")
        for name in self.up_block_types:
            if name not in UP_BLOCK_TYPES:
                raise ValueError(f"up_block_types: {name!r} is not supported; use {UP_BLOCK_TYPES}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn must be 'silu' (or 'swish'); got {self.act_fn!r}")
        if self.norm_type not in ("group", "spatial"):
            raise ValueError(f"norm_type must be 'group' or 'spatial'; got {self.norm_type!r}")
        if self.lookup_from_codebook:
            raise ValueError("lookup_from_codebook=True is not supported")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1; got {self.layers_per_block}")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"block_out_channels {tuple(self.block_out_channels)} must be "
                                 f"multiples of norm_num_groups={self.norm_num_groups}")
            if self.norm_type == "spatial" and channels % SPATIAL_NORM_GROUPS:
                raise ValueError(f"norm_type='spatial' needs block_out_channels that are multiples "
                                 f"of {SPATIAL_NORM_GROUPS}; got {tuple(self.block_out_channels)}")


# --------------------------------------------------------------------------------------------
# Functional pieces


_bias_add = ops.BiasAdd()  # adds a (C,) vector along axis 1; much faster than a broadcast add
_bmm_transpose_a = ops.BatchMatMul(transpose_a=True)
_bmm_transpose_b = ops.BatchMatMul(transpose_b=True)
_batch_norm_ops: dict = {}


def _batch_norm(eps: float):
    op = _batch_norm_ops.get(eps)
    if op is None:
        op = ops.BatchNorm(is_training=False, epsilon=eps)
        _batch_norm_ops[eps] = op
    return op


def _row_sums(x):
    """(R, N) -> (R,) with the last axis summed in two stages through a matmul.

    A plain ReduceSum over a million float32 values has a relative error near 4e-6; summing
    blocks of `k` with BLAS first keeps it near 1e-7 (torch's group norm is that exact).
    """
    rows, n = x.shape
    k = math.gcd(n, 1024)
    ones = ops.ones((k, 1), x.dtype)
    return ops.matmul(x.reshape(rows, n // k, k), ones).reshape(rows, n // k).sum(-1)


def group_moments(x, num_groups: int):
    """x (B, C, H, W) -> (x minus its group mean (B, C, H, W), group variance (B, G)), float32.

    Two-pass (center first, then square) as torch's kernel is exact for large means.
    """
    b, c, h, w = x.shape
    rows = x.astype(ms.float32).reshape(b * num_groups, -1)  # (B*G, C/G*H*W)
    n = rows.shape[1]
    mean = _row_sums(rows) / n  # (B*G,)
    centered = _bias_add(rows.reshape(1, b * num_groups, n), -mean).reshape(b * num_groups, n)
    var = _row_sums(centered * centered) / n
    return centered.reshape(b, c, h, w), var.reshape(b, num_groups)


def _per_channel(stat, channels: int):
    """(B, G) group statistic -> (B, C) with each group's value on its channels."""
    b, g = stat.shape
    return ops.broadcast_to(stat.reshape(b, g, 1), (b, g, channels // g)).reshape(b, channels)


def group_norm(x, num_groups: int, weight, bias, eps: float):
    """torch.nn.functional.group_norm for (B, C, H, W)."""
    b, c, h, w = x.shape
    centered, var = group_moments(x, num_groups)
    var_c = _per_channel(var, c).reshape(b * c)
    weight = weight.astype(ms.float32)
    bias = bias.astype(ms.float32)
    if b > 1:
        weight, bias = ops.tile(weight, (b,)), ops.tile(bias, (b,))
    # BatchNorm inference with mean 0 and the group variances = (x - mean) * rsqrt(var + eps) * w + b,
    # per channel, in one fast kernel; the batch is folded into the channel axis.
    y = _batch_norm(eps)(centered.reshape(1, b * c, h, w), weight, bias, ops.zeros_like(var_c), var_c)[0]
    return y.reshape(b, c, h, w).astype(x.dtype)


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


_index_cache: dict = {}


def _nearest_index(in_size: int, out_size: int) -> Tensor:
    key = (in_size, out_size)
    if key not in _index_cache:
        _index_cache[key] = Tensor(torch_nearest_indices(in_size, out_size).astype(np.int32))
    return _index_cache[key]


def interpolate_nearest(x, size: tuple[int, int]):
    """torch `F.interpolate(x, size=size, mode="nearest")` for (B, C, H, W).

    Two gathers (rows, then columns): measured ~5x faster on CPU than broadcast_to +
    contiguous or ResizeNearestNeighbor for (1, 128, 64, 64) -> 512x512.
    """
    h, w = x.shape[2], x.shape[3]
    out_h, out_w = size
    if (out_h, out_w) == (h, w):
        return x
    return ops.gather(ops.gather(x, _nearest_index(h, out_h), 2), _nearest_index(w, out_w), 3)


def _conv_numpy(x_np: np.ndarray, conv: Conv2d, stride: int, padding: int) -> Tensor:
    weight = conv.weight.asnumpy()
    bias = None if conv.bias is None else conv.bias.asnumpy()
    out = conv2d_numpy(x_np.astype(weight.dtype, copy=False), weight, bias, stride, padding)
    return Tensor.from_numpy(np.ascontiguousarray(out))


# --------------------------------------------------------------------------------------------
# CPU convolution for large feature maps
#
# backend/nn/conv.py's im2col builds the (C*9, H*W) matrix with one 6-D strided copy; at
# 512x512 that copy (1.2-2.4 GB) dominates: measured 20-40 GFLOP/s for a 128-channel 3x3
# conv at 512x512 against ~150 with the scheme below and ~300 for torch (oneDNN).
#
# Scheme: pad the input once into a (C, H+2p+1, W+2p) buffer and flatten each channel. In
# that flat layout the input pixel under kernel tap (dy, dx) of output pixel (i, j) sits at
# a fixed offset dy*(W+2p) + dx from position i*(W+2p) + j, so each tap's im2col slab is a
# plain slice (contiguous per channel). The output is computed over bands of rows so the
# slabs stay a few MB (cache-sized, reused), and the 2p padding columns of each output row
# are dropped at the end. When there are far fewer output than input channels (conv_out:
# 128 -> 3) the taps are summed on the output side instead: one matmul over the padded
# input for all taps, then kh*kw shifted adds of (O, L) slices.

BAND_COLUMNS = 8192  # output positions per band; measured best of 2k/8k/32k/all at 512x512


def pad_flat_numpy(x: np.ndarray, padding: int) -> np.ndarray:
    """(B, C, H, W) -> zero-padded (B, C, H+2p+1, W+2p); the extra row absorbs tap offsets."""
    b, c, h, w = x.shape
    padded = np.zeros((b, c, h + 2 * padding + 1, w + 2 * padding), dtype=x.dtype)
    padded[:, :, padding:padding + h, padding:padding + w] = x
    return padded


def conv2d_padded_numpy(padded: np.ndarray, height: int, width: int, weight: np.ndarray,
                        bias: np.ndarray | None) -> np.ndarray:
    """Stride-1 conv of a `pad_flat_numpy` buffer -> (B, O, height, width)."""
    b, c, _, row = padded.shape
    o, _, kh, kw = weight.shape
    flat = padded.reshape(b, c, -1)  # a view: the buffer is contiguous
    offsets = [dy * row + dx for dy in range(kh) for dx in range(kw)]
    taps = kh * kw
    rows_per_band = max(1, min(height, BAND_COLUMNS // row))
    out = np.empty((b, o, height, width), dtype=padded.dtype)
    sum_outputs = 2 * o < c
    if sum_outputs:
        w_taps = np.ascontiguousarray(weight.transpose(2, 3, 0, 1).reshape(taps * o, c))
    else:
        w_cols = np.ascontiguousarray(weight.transpose(0, 2, 3, 1).reshape(o, taps * c))
        cols = np.empty((taps, c, rows_per_band * row), dtype=padded.dtype)
    for bi in range(b):
        for r0 in range(0, height, rows_per_band):
            r = min(rows_per_band, height - r0)
            n = r * row
            base = r0 * row
            if sum_outputs:
                z = np.matmul(w_taps, flat[bi, :, base:base + n + offsets[-1]]).reshape(taps, o, -1)
                y = z[0, :, :n].copy()
                for k in range(1, taps):
                    y += z[k, :, offsets[k]:offsets[k] + n]
            else:
                slabs = cols if n == cols.shape[2] else np.empty((taps, c, n), dtype=padded.dtype)
                for k, offset in enumerate(offsets):
                    slabs[k] = flat[bi, :, base + offset:base + offset + n]
                y = np.matmul(w_cols, slabs.reshape(taps * c, n))  # (O, n)
            band = y.reshape(o, r, row)[:, :, :width]
            if bias is None:
                out[bi, :, r0:r0 + r] = band
            else:
                np.add(band, bias.reshape(o, 1, 1), out=out[bi, :, r0:r0 + r])
    return out


class Conv2dSame(Conv2d):
    """Stride-1 conv with padding = kernel // 2 (torch.nn.Conv2d(..., padding=k//2)).

    On CPU it runs through `conv2d_padded_numpy` (a 1x1 kernel: one matmul) and hands the
    result to MindSpore with `Tensor.from_numpy`, which shares the buffer: `Tensor(array)`
    copies, ~100 ms per 128 MB (a (1, 128, 512, 512) map).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2)

    def _weights(self):
        return self.weight.asnumpy(), None if self.bias is None else self.bias.asnumpy()

    def run_padded(self, padded: np.ndarray, height: int, width: int) -> Tensor:
        weight, bias = self._weights()
        out = conv2d_padded_numpy(padded.astype(weight.dtype, copy=False), height, width, weight, bias)
        return Tensor.from_numpy(out)

    def construct(self, x):
        if not on_cpu():
            return super().construct(x)
        x_np = x.asnumpy()  # shares the tensor's memory; only read
        if self.kernel_size == 1:
            weight, bias = self._weights()
            b, c, h, w = x_np.shape
            out = np.matmul(weight.reshape(-1, c), x_np.reshape(b, c, h * w).astype(weight.dtype, copy=False))
            if bias is not None:
                out += bias.reshape(1, -1, 1)
            return Tensor.from_numpy(out.reshape(b, -1, h, w))
        return self.run_padded(pad_flat_numpy(x_np, self.padding), x_np.shape[2], x_np.shape[3])


# --------------------------------------------------------------------------------------------
# Layers


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm over (B, C, H, W) built from fast CPU kernels (see `group_norm`)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.weight = ones_parameter((num_channels,))
        self.bias = zeros_parameter((num_channels,))

    def construct(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class SpatialNorm(nn.Cell):
    """group_norm(f) * conv_y(zq) + conv_b(zq), zq resized (nearest) to f's size.

    Nearest resizing only picks pixels, so it commutes with the 1x1 convs and the group norm's
    per-channel affine: both factor maps are formed at zq's resolution and resized last,
    out = (f - mean) * up(rstd * w * conv_y(zq)) + up(b * conv_y(zq) + conv_b(zq)).
    """

    def __init__(self, f_channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = GroupNorm(SPATIAL_NORM_GROUPS, f_channels, eps=SPATIAL_NORM_EPS)
        self.conv_y = Conv2dSame(zq_channels, f_channels, 1)
        self.conv_b = Conv2dSame(zq_channels, f_channels, 1)

    def construct(self, f, zq):
        b, c, h, w = f.shape
        centered, var = group_moments(f, SPATIAL_NORM_GROUPS)  # (B, C, H, W), (B, G)
        rstd = _per_channel(ops.rsqrt(var + self.norm_layer.eps), c)  # (B, C)
        gamma = self.norm_layer.weight.astype(ms.float32).reshape(1, c, 1, 1)
        beta = self.norm_layer.bias.astype(ms.float32).reshape(1, c, 1, 1)
        y = self.conv_y(zq).astype(ms.float32)  # (B, C, zh, zw)
        scale = y * (rstd.reshape(b, c, 1, 1) * gamma)
        shift = y * beta + self.conv_b(zq).astype(ms.float32)
        out = centered * interpolate_nearest(scale, (h, w)) + interpolate_nearest(shift, (h, w))
        return out.astype(f.dtype)


class Attention(nn.Cell):
    """diffusers `Attention` as the VAE blocks build it: one head of width `channels`, q/k/v/out
    projections with bias, a group norm or spatial norm first, residual connection.

    Computed channels-first: (B, C, N) tensors and weight @ x projections, so no transposes.
    """

    def __init__(self, channels: int, norm_num_groups: int | None = None,
                 spatial_norm_dim: int | None = None, eps: float = NORM_EPS,
                 rescale_output_factor: float = 1.0):
        super().__init__()
        self.channels = channels
        self.scale = channels ** -0.5  # single head: head dim = channels
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = GroupNorm(norm_num_groups, channels, eps) if norm_num_groups else None
        self.spatial_norm = SpatialNorm(channels, spatial_norm_dim) if spatial_norm_dim else None
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.CellList([Linear(channels, channels)])  # to_out.1 is torch's Dropout

    @staticmethod
    def _project(linear: Linear, x, scale: float = 1.0):
        """(B, C, N) -> weight @ x + bias, (B, C, N)."""
        weight, bias = linear.weight, linear.bias
        if scale != 1.0:
            weight, bias = weight * scale, bias * scale
        return _bias_add(ops.matmul(weight, x), bias)

    def construct(self, hidden_states, zq=None):
        residual = hidden_states  # (B, C, H, W)
        if self.spatial_norm is not None:
            hidden_states = self.spatial_norm(hidden_states, zq)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states)
        b, c, h, w = hidden_states.shape
        n = h * w
        x = hidden_states.reshape(b, c, n)
        # softmax(q^T k / sqrt(C)): the 1/sqrt(C) is folded into the query projection.
        q = self._project(self.to_q, x, self.scale)  # (B, C, N)
        k = self._project(self.to_k, x)
        v = self._project(self.to_v, x)
        chunk = max(1, MAX_SCORE_ELEMENTS // n)
        outs = []
        for start in range(0, n, chunk):
            q_block = q if chunk >= n else q[:, :, start:start + chunk]
            scores = _bmm_transpose_a(q_block, k)  # (B, Nq, N)
            probs = ops.softmax(scores.astype(ms.float32), axis=-1).astype(v.dtype)
            outs.append(_bmm_transpose_b(v, probs))  # (B, C, Nq)
        attended = outs[0] if len(outs) == 1 else ops.concat(outs, axis=2)
        out = self._project(self.to_out[0], attended).reshape(b, c, h, w)
        out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


class ResnetBlock2D(nn.Cell):
    """diffusers `ResnetBlock2D` with no time embedding (temb None), or `ResnetBlockCondNorm2D`
    with spatial norms when `zq_channels` is given.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float = NORM_EPS,
                 zq_channels: int | None = None, output_scale_factor: float = 1.0):
        super().__init__()
        self.spatial = zq_channels is not None
        if self.spatial:
            self.norm1 = SpatialNorm(in_channels, zq_channels)
            self.norm2 = SpatialNorm(out_channels, zq_channels)
        else:
            self.norm1 = GroupNorm(groups, in_channels, eps)
            self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv1 = Conv2dSame(in_channels, out_channels, 3)
        self.conv2 = Conv2dSame(out_channels, out_channels, 3)
        self.conv_shortcut = Conv2dSame(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def _norm(self, norm, x, zq):
        return norm(x, zq) if self.spatial else norm(x)

    def construct(self, x, zq=None):
        h = silu(self._norm(self.norm1, x, zq))
        h = self.conv1(h)
        h = silu(self._norm(self.norm2, h, zq))
        h = self.conv2(h)  # dropout 0 at inference
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Cell):
    """Stride-2 3x3 conv after padding right and bottom by one (diffusers padding=0 variant)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def construct(self, x):
        if on_cpu():
            x_np = np.pad(x.asnumpy(), ((0, 0), (0, 0), (0, 1), (0, 1)))
            return _conv_numpy(x_np, self.conv, stride=2, padding=0)
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Cell):
    """Nearest 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2dSame(channels, channels, 3)

    def construct(self, x):
        b, c, h, w = x.shape
        if not on_cpu():
            return self.conv(interpolate_nearest(x, (2 * h, 2 * w)))
        # The conv leaves for numpy anyway: write each pixel four times straight into the
        # zero-padded buffer the conv reads (one copy instead of upsample, then pad).
        x_np = x.asnumpy()
        padded = np.zeros((b, c, 2 * h + 3, 2 * w + 2), dtype=x_np.dtype)  # pad_flat_numpy layout
        for dy in (1, 2):
            for dx in (1, 2):
                padded[:, :, dy:dy + 2 * h:2, dx:dx + 2 * w:2] = x_np
        return self.conv.run_padded(padded, 2 * h, 2 * w)


# --------------------------------------------------------------------------------------------
# Blocks


class DownEncoderBlock2D(nn.Cell):
    """Resnets (each followed by an attention in AttnDownEncoderBlock2D), then a downsampler."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_downsample: bool, add_attention: bool = False):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_layers)])
        self.attentions = nn.CellList([
            Attention(out_channels, norm_num_groups=groups) for _ in range(num_layers)
        ]) if add_attention else None
        self.downsamplers = nn.CellList([Downsample2D(out_channels)]) if add_downsample else None

    def construct(self, x):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Cell):
    """Resnets (each followed by an attention in AttnUpDecoderBlock2D), then an upsampler."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_upsample: bool, zq_channels: int | None, add_attention: bool = False):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups,
                          zq_channels=zq_channels)
            for i in range(num_layers)])
        # With spatial norm the attention is normed by a SpatialNorm, else by a group norm.
        self.attentions = nn.CellList([
            Attention(out_channels, norm_num_groups=None if zq_channels else groups,
                      spatial_norm_dim=zq_channels)
            for _ in range(num_layers)]) if add_attention else None
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if add_upsample else None

    def construct(self, x, zq=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, zq)
            if self.attentions is not None:
                x = self.attentions[i](x, zq)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Cell):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, zq_channels: int | None, add_attention: bool):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(channels, channels, groups, zq_channels=zq_channels) for _ in range(2)])
        self.add_attention = add_attention
        # torch keeps [None] when attention is off: no parameters either way.
        self.attentions = nn.CellList([
            Attention(channels, norm_num_groups=None if zq_channels else groups,
                      spatial_norm_dim=zq_channels)
        ] if add_attention else [])

    def construct(self, x, zq=None):
        x = self.resnets[0](x, zq)
        if self.add_attention:
            x = self.attentions[0](x, zq)
        return self.resnets[1](x, zq)


class Encoder(nn.Cell):
    def __init__(self, config: VQModelConfig):
        super().__init__()
        channels = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = Conv2dSame(config.in_channels, channels[0], 3)
        blocks = []
        for i, block_type in enumerate(config.down_block_types):
            blocks.append(DownEncoderBlock2D(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                add_downsample=i < len(channels) - 1,
                add_attention=block_type == "AttnDownEncoderBlock2D"))
        self.down_blocks = nn.CellList(blocks)
        self.mid_block = UNetMidBlock2D(channels[-1], groups, None, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, channels[-1], NORM_EPS)
        self.conv_out = Conv2dSame(channels[-1], config.latent_channels, 3)  # double_z=False

    def construct(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class Decoder(nn.Cell):
    def __init__(self, config: VQModelConfig):
        super().__init__()
        channels = list(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        # The quantized latent conditions every norm (MoVQ); its channels are latent_channels.
        zq_channels = config.latent_channels if config.norm_type == "spatial" else None
        self.conv_in = Conv2dSame(config.latent_channels, channels[0], 3)
        self.mid_block = UNetMidBlock2D(channels[0], groups, zq_channels, config.mid_block_add_attention)
        blocks = []
        for i, block_type in enumerate(config.up_block_types):
            blocks.append(UpDecoderBlock2D(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups,
                add_upsample=i < len(channels) - 1, zq_channels=zq_channels,
                add_attention=block_type == "AttnUpDecoderBlock2D"))
        self.up_blocks = nn.CellList(blocks)
        if zq_channels:
            self.conv_norm_out = SpatialNorm(channels[-1], zq_channels)
        else:
            self.conv_norm_out = GroupNorm(groups, channels[-1], NORM_EPS)
        self.spatial = zq_channels is not None
        self.conv_out = Conv2dSame(channels[-1], config.out_channels, 3)

    def construct(self, x, zq=None):
        x = self.conv_in(x)
        x = self.mid_block(x, zq)
        for block in self.up_blocks:
            x = block(x, zq)
        x = self.conv_norm_out(x, zq) if self.spatial else self.conv_norm_out(x)
        return self.conv_out(silu(x))


class VectorQuantizer(nn.Cell):
    """Nearest codebook vector per latent pixel (diffusers `VectorQuantizer`, legacy=True, no remap).

    Inference only: the commitment loss is not computed.
    """

    def __init__(self, num_embeddings: int, embed_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embed_dim = embed_dim
        self.embedding = Embedding(num_embeddings, embed_dim)

    def construct(self, z):
        """z (B, D, H, W) -> (quantized (B, D, H, W), codebook indices (B*H*W,) int32)."""
        b, d, h, w = z.shape
        flat = z.transpose(0, 2, 3, 1).reshape(-1, d)  # (N, D), pixels in (B, H, W) order
        codebook = self.embedding.weight  # (K, D)
        code_sq = (codebook * codebook).sum(-1).reshape(1, -1)  # (1, K)
        rows = max(1, MAX_DISTANCE_ELEMENTS // self.num_embeddings)
        indices = []
        for start in range(0, flat.shape[0], rows):
            block = flat[start:start + rows]
            # torch.cdist's matmul form |z|^2 - 2 z.e + |e|^2; sqrt does not change the argmin.
            dist = (block * block).sum(-1, keepdims=True) - 2 * ops.matmul(block, codebook.T) + code_sq
            indices.append(ops.argmin(dist, axis=1).astype(ms.int32))
        index = indices[0] if len(indices) == 1 else ops.concat(indices, axis=0)
        quantized = ops.gather(codebook, index, 0)
        quantized = flat + (quantized - flat)  # diffusers' straight-through form, same rounding
        return quantized.reshape(b, h, w, d).transpose(0, 3, 1, 2), index


# --------------------------------------------------------------------------------------------
# Model


class VQModel(nn.Cell):
    """MoVQ autoencoder: `encode(images)["latents"]`, `decode(latents)["sample"]`."""

    def __init__(self, config: VQModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        embed_dim = config.vq_embed_dim or config.latent_channels
        self.encoder = Encoder(config)
        self.quant_conv = Conv2dSame(config.latent_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(config.num_vq_embeddings, embed_dim)
        self.post_quant_conv = Conv2dSame(embed_dim, config.latent_channels, 1)
        self.decoder = Decoder(config)

    @classmethod
    def from_config(cls, config: dict) -> "VQModel":
        return cls(VQModelConfig.from_dict(config))

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along each axis."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x) -> dict:
        """x (B, in_channels, H, W) in [-1, 1] -> {"latents": (B, vq_embed_dim, H/f, W/f)}.

        The latents are the quant_conv output before quantization, as diffusers returns them.
        """
        self._check_input("x", x, self.config.in_channels)
        return {"latents": self.quant_conv(self.encoder(x))}

    def decode(self, latents, force_not_quantize: bool = False) -> dict:
        """latents (B, vq_embed_dim, h, w) -> {"sample": (B, out_channels, h*f, w*f)}.

        `force_not_quantize=False` (diffusers' default) first snaps each latent pixel to its
        nearest codebook vector; the Kandinsky pipelines pass True.
        """
        self._check_input("latents", latents, self.config.vq_embed_dim or self.config.latent_channels)
        quant = latents if force_not_quantize else self.quantize(latents)[0]
        x = self.post_quant_conv(quant)
        zq = quant if self.config.norm_type == "spatial" else None
        return {"sample": self.decoder(x, zq)}

    def construct(self, x):
        return self.decode(self.encode(x)["latents"])["sample"]

    @staticmethod
    def _check_input(name: str, x, channels: int) -> None:
        if len(x.shape) != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must have shape (B, {channels}, H, W); got {tuple(x.shape)}")
