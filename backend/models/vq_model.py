"""MoVQ: the VQ autoencoder that Kandinsky 2.1, 2.2 and 3 decode latents with.

Port of diffusers 0.35.2 `VQModel` (models/autoencoders/vq_model.py) with the pieces it is
built from: `Encoder`, `Decoder`, `VectorQuantizer` (autoencoders/vae.py),
`DownEncoderBlock2D`, `AttnDownEncoderBlock2D`, `UpDecoderBlock2D`, `AttnUpDecoderBlock2D`,
`UNetMidBlock2D` (unets/unet_2d_blocks.py), `ResnetBlock2D` / `ResnetBlockCondNorm2D`
(resnet.py), `Downsample2D` / `Upsample2D`, `Attention` with `AttnProcessor2_0` and
`SpatialNorm` (attention_processor.py). MoVQ itself: Zheng et al. 2022,
https://huggingface.co/papers/2209.09002.

Attribute paths equal the diffusers checkpoint keys (`decoder.up_blocks.0.attentions.1.to_q.weight`).

On CPU the activations run as numpy arrays ("host path", see below): 3x3 convs through
`conv2d_padded_numpy` (row-offset im2col slabs + oneDNN sgemm), norms and attention in
numpy. The mindspore.ops path is what runs on GPU and Ascend. tools/bench_movq.py times a
512x512 decode against diffusers.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, fields

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from backend import interrupt
from backend.device import on_cpu
from backend.nn import Embedding, Linear, layers
from backend.nn.host import conv2d_host, host_gemm
# float32 matmul on host arrays through MindSpore's bundled oneDNN sgemm (AVX-512, split over the
# cores): ~1.75x numpy's per CPU second on these convs, since the environment pins OpenBLAS to
# its Haswell (AVX2) kernels. Defined with the UNet; falls back to np.matmul without the library.
from backend.nn.host import host_matmul

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
# Two paths. On CPU the activations are numpy arrays from the first layer to the last ("host
# path", as in unet_2d_condition.py): measured on this 2-core machine, MindSpore's PyNative CPU
# kernels on large maps are slow and erratic under load (a (1, 128, 512, 512) broadcast
# multiply ~340 ms, a spatial norm at (1, 512, 64, 64) ~200 ms of CPU time against ~15 ms in
# numpy). Every layer takes a numpy array or a Tensor and returns the same kind; Tensors go
# through mindspore.ops, which is what runs on GPU and Ascend. Parameters stay Parameters; the
# host path reads them with asnumpy(), a view of the same memory on CPU.


def _host(x) -> bool:
    return isinstance(x, np.ndarray)


def _np(param) -> np.ndarray:
    """float32 numpy view of a parameter (a converted copy for half-precision weights)."""
    array = param.asnumpy()
    return array if array.dtype == np.float32 else array.astype(np.float32)


def silu(x):
    if not _host(x):
        return layers.silu(x)
    return _silu_inplace(np.array(x, dtype=np.float32))


def _silu_inplace(x: np.ndarray) -> np.ndarray:
    """x / (1 + exp(-x)) written into x (which must be a fresh array)."""
    denominator = np.negative(x)
    with np.errstate(over="ignore"):  # exp(-x) -> inf for x << 0 gives x / inf = -0, as torch
        np.exp(denominator, out=denominator)
    denominator += 1
    return np.divide(x, denominator, out=x)


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


def _repeat_factor(in_size: int, out_size: int) -> int | None:
    """f when torch's nearest rule maps output i to input i // f, else None."""
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
    if _host(x):
        if out_h != h:
            x = x.take(torch_nearest_indices(h, out_h), axis=2)
        return x if out_w == w else x.take(torch_nearest_indices(w, out_w), axis=3)
    return ops.gather(ops.gather(x, _nearest_index(h, out_h), 2), _nearest_index(w, out_w), 3)


# Device path (mindspore.ops). On CPU, MindSpore's broadcasting element-wise kernels are slow
# while `ops.BatchNorm` inference and `ops.BiasAdd` are fast, so the group norms use those.

_bias_add = ops.BiasAdd()  # adds a (C,) vector along axis 1
_bmm_transpose_a = ops.BatchMatMul(transpose_a=True)
_bmm_transpose_b = ops.BatchMatMul(transpose_b=True)
_batch_norm_ops: dict = {}


def _batch_norm(eps: float):
    if eps not in _batch_norm_ops:
        _batch_norm_ops[eps] = ops.BatchNorm(is_training=False, epsilon=eps)
    return _batch_norm_ops[eps]


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
    """x (B, C, H, W) -> (x minus its group mean, float32 (B, C, H, W); group variance (B, G)).

    Two passes (center, then square) with blocked sums: as exact as torch's kernel also when a
    group's mean is large against its spread. On the host path the centered array is fresh.
    """
    b, c, h, w = x.shape
    if _host(x):
        rows = x.reshape(b * num_groups, -1)
        n = rows.shape[1]
        mean = rows.sum(axis=1, dtype=np.float32) / np.float32(n)  # numpy sums pairwise
        centered = np.subtract(rows, mean[:, None], dtype=np.float32)
        k = math.gcd(n, 1024)
        blocks = centered.reshape(b * num_groups, n // k, k)
        var = np.einsum("rmk,rmk->rm", blocks, blocks).sum(axis=1) / np.float32(n)
        return centered.reshape(b, c, h, w), var.reshape(b, num_groups)
    rows = x.astype(ms.float32).reshape(b * num_groups, -1)  # (B*G, C/G*H*W)
    n = rows.shape[1]
    mean = _row_sums(rows) / n  # (B*G,)
    centered = _bias_add(rows.reshape(1, b * num_groups, n), -mean).reshape(b * num_groups, n)
    var = _row_sums(centered * centered) / n
    return centered.reshape(b, c, h, w), var.reshape(b, num_groups)


def _per_channel(stat, channels: int):
    """(B, G) group statistic -> (B, C) with each group's value on its channels."""
    b, g = stat.shape
    if _host(stat):
        return np.repeat(stat, channels // g, axis=1)
    return ops.broadcast_to(stat.reshape(b, g, 1), (b, g, channels // g)).reshape(b, channels)


def group_norm(x, num_groups: int, weight, bias, eps: float, act: bool = False):
    """torch.nn.functional.group_norm for (B, C, H, W), then SiLU if `act`."""
    b, c, h, w = x.shape
    centered, var = group_moments(x, num_groups)
    if _host(x):
        rstd = 1 / np.sqrt(var + np.float32(eps))  # (B, G)
        scale = _per_channel(rstd, c) * _np(weight)  # (B, C)
        y = centered.reshape(b, c, h * w)
        y *= scale[:, :, None]
        y += _np(bias)[None, :, None]
        y = y.reshape(b, c, h, w)
        return _silu_inplace(y) if act else y
    var_c = _per_channel(var, c).reshape(b * c)
    weight = weight.astype(ms.float32)
    bias = bias.astype(ms.float32)
    if b > 1:
        weight, bias = ops.tile(weight, (b,)), ops.tile(bias, (b,))
    # BatchNorm inference with mean 0 and the group variances = (x - mean) * rsqrt(var + eps) * w + b,
    # per channel, in one kernel; the batch is folded into the channel axis.
    y = _batch_norm(eps)(centered.reshape(1, b * c, h, w), weight, bias, ops.zeros_like(var_c), var_c)[0]
    y = y.reshape(b, c, h, w).astype(x.dtype)
    return layers.silu(y) if act else y


# --------------------------------------------------------------------------------------------
# Host convolution for large feature maps
#
# backend/nn/conv.py's im2col builds the (C*9, H*W) matrix with one 6-D strided copy; at
# 512x512 that copy (1.2-2.4 GB) dominates: measured 20-40 GFLOP/s for a 128-channel 3x3
# conv at 512x512 against ~80 (numpy matmul) or ~130 (oneDNN sgemm) with the scheme below;
# per CPU second the latter matches torch's own convolution (140-190 GFLOP/s).
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
    padded = np.zeros((b, c, h + 2 * padding + 1, w + 2 * padding), dtype=np.float32)
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
    out = np.empty((b, o, height, width), dtype=np.float32)
    sum_outputs = 2 * o < c
    if sum_outputs:
        w_taps = np.ascontiguousarray(weight.transpose(2, 3, 0, 1).reshape(taps * o, c))
    else:
        w_cols = np.ascontiguousarray(weight.transpose(0, 2, 3, 1).reshape(o, taps * c))
    slab_buffers = {}  # one reused (taps, C, band) buffer per thread
    items = [(bi, r0) for bi in range(b) for r0 in range(0, height, rows_per_band)]

    def one_band(index: int) -> None:
        bi, r0 = items[index]
        r = min(rows_per_band, height - r0)
        n = r * row
        base = r0 * row
        if sum_outputs:
            z = host_matmul(w_taps, flat[bi, :, base:base + n + offsets[-1]]).reshape(taps, o, -1)
            y = z[0, :, :n].copy()
            for k in range(1, taps):
                y += z[k, :, offsets[k]:offsets[k] + n]
        else:
            cols = slab_buffers.get(threading.get_ident())
            if cols is None:
                cols = slab_buffers[threading.get_ident()] = np.empty((taps, c, rows_per_band * row), np.float32)
            slabs = cols if n == cols.shape[2] else np.empty((taps, c, n), dtype=np.float32)
            for k, offset in enumerate(offsets):
                slabs[k] = flat[bi, :, base + offset:base + offset + n]
            y = host_matmul(w_cols, slabs.reshape(taps * c, n))  # (O, n)
        band = y.reshape(o, r, row)[:, :, :width]
        if bias is None:
            out[bi, :, r0:r0 + r] = band
        else:
            np.add(band, bias.reshape(o, 1, 1), out=out[bi, :, r0:r0 + r])

    # whole bands per core (copies and product on one thread: one hand-off per convolution);
    # a single band splits its product over the cores instead
    host_gemm().parallel(len(items), one_band)
    return out


# --------------------------------------------------------------------------------------------
# Layers


class Conv2dSame(layers.Conv2d):
    """Stride-1 conv with padding = kernel // 2 (torch.nn.Conv2d(..., padding=k//2)); host arrays
    go through `conv2d_padded_numpy` (a 1x1 kernel: one matmul)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2)

    def run_padded(self, padded: np.ndarray, height: int, width: int) -> np.ndarray:
        bias = None if self.bias is None else _np(self.bias)
        return conv2d_padded_numpy(padded, height, width, _np(self.weight), bias)

    def construct(self, x):
        if not _host(x):
            return super().construct(x)
        if self.kernel_size == 1:
            b, c, h, w = x.shape
            out = host_matmul(_np(self.weight).reshape(-1, c), x.reshape(b, c, h * w))
            if self.bias is not None:
                out += _np(self.bias)[None, :, None]
            return out.reshape(b, -1, h, w)
        return self.run_padded(pad_flat_numpy(x, self.padding), x.shape[2], x.shape[3])


class GroupNorm(layers.GroupNorm):
    """torch.nn.GroupNorm over (B, C, H, W) (see `group_norm`), SiLU fused when `act`."""

    def construct(self, x, act: bool = False):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, act)


class SpatialNorm(nn.Cell):
    """group_norm(f) * conv_y(zq) + conv_b(zq), zq resized (nearest) to f's size; SiLU fused
    when `act`.

    Nearest resizing only picks pixels, so it commutes with the 1x1 convs and the group norm's
    per-channel affine: both factor maps are formed at zq's resolution and resized last,
    out = (f - mean) * up(rstd * w * conv_y(zq)) + up(b * conv_y(zq) + conv_b(zq)).
    """

    def __init__(self, f_channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = GroupNorm(SPATIAL_NORM_GROUPS, f_channels, eps=SPATIAL_NORM_EPS)
        self.conv_y = Conv2dSame(zq_channels, f_channels, 1)
        self.conv_b = Conv2dSame(zq_channels, f_channels, 1)

    def construct(self, f, zq, act: bool = False):
        if _host(f):
            return self._host_forward(f, zq, act)
        b, c, h, w = f.shape
        centered, var = group_moments(f, SPATIAL_NORM_GROUPS)  # (B, C, H, W), (B, G)
        rstd = _per_channel(ops.rsqrt(var + self.norm_layer.eps), c)  # (B, C)
        gamma = self.norm_layer.weight.astype(ms.float32).reshape(1, c, 1, 1)
        beta = self.norm_layer.bias.astype(ms.float32).reshape(1, c, 1, 1)
        y = self.conv_y(zq).astype(ms.float32)  # (B, C, zh, zw)
        scale = y * (rstd.reshape(b, c, 1, 1) * gamma)
        shift = y * beta + self.conv_b(zq).astype(ms.float32)
        out = centered * interpolate_nearest(scale, (h, w)) + interpolate_nearest(shift, (h, w))
        out = out.astype(f.dtype)
        return layers.silu(out) if act else out

    def _host_forward(self, f, zq, act):
        b, c, h, w = f.shape
        zh, zw = zq.shape[2], zq.shape[3]
        centered, var = group_moments(f, SPATIAL_NORM_GROUPS)  # fresh (B, C, H, W), (B, G)
        rstd = _per_channel(1 / np.sqrt(var + np.float32(self.norm_layer.eps)), c)  # (B, C)
        y = self.conv_y(zq)  # (B, C, zh, zw)
        scale = y * (rstd * _np(self.norm_layer.weight))[:, :, None, None]
        shift = self.conv_b(zq)
        shift += y * _np(self.norm_layer.bias)[None, :, None, None]
        fh, fw = _repeat_factor(zh, h), _repeat_factor(zw, w)
        if fh is None or fw is None:
            centered *= interpolate_nearest(scale, (h, w))
            centered += interpolate_nearest(shift, (h, w))
        else:
            # Repeat columns only; the fh repeated rows come from broadcasting along a whole
            # row, so no full-size factor map is ever written.
            rows = centered.reshape(b, c, zh, fh, w)
            rows *= interpolate_nearest(scale, (zh, w))[:, :, :, None, :]
            rows += interpolate_nearest(shift, (zh, w))[:, :, :, None, :]
        return _silu_inplace(centered) if act else centered


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

    def _project(self, linear: Linear, x, scale: float = 1.0):
        """(B, C, N) -> weight @ x + bias, (B, C, N); `scale` folded into weight and bias."""
        if _host(x):
            y = host_matmul(_np(linear.weight), x)
            y += _np(linear.bias)[None, :, None]
            if scale != 1.0:
                y *= np.float32(scale)
            return y
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
        # softmax(q^T k / sqrt(C)): the 1/sqrt(C) is applied to the query.
        q = self._project(self.to_q, x, self.scale)  # (B, C, N)
        k = self._project(self.to_k, x)
        v = self._project(self.to_v, x)
        chunk = max(1, MAX_SCORE_ELEMENTS // n)  # query rows per block of scores
        if _host(x):
            attended = np.empty((b, c, n), np.float32)
            for i in range(b):
                for start in range(0, n, chunk):
                    block = slice(start, start + chunk)
                    scores = host_matmul(q[i, :, block].T, k[i])  # (Nq, N)
                    scores -= scores.max(axis=-1, keepdims=True)
                    np.exp(scores, out=scores)
                    scores /= scores.sum(axis=-1, keepdims=True)
                    host_matmul(v[i], scores.T, out=attended[i, :, block])  # (C, Nq)
            out = self._project(self.to_out[0], attended).reshape(b, c, h, w)
            out += residual
        else:
            outs = []
            for start in range(0, n, chunk):
                q_block = q if chunk >= n else q[:, :, start:start + chunk]
                scores = _bmm_transpose_a(q_block, k)  # (B, Nq, N)
                probs = ops.softmax(scores.astype(ms.float32), axis=-1).astype(v.dtype)
                outs.append(_bmm_transpose_b(v, probs))  # (B, C, Nq)
            attended = outs[0] if len(outs) == 1 else ops.concat(outs, axis=2)
            out = self._project(self.to_out[0], attended).reshape(b, c, h, w) + residual
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

    def _norm_silu(self, norm, x, zq):
        return norm(x, zq, act=True) if self.spatial else norm(x, act=True)

    def construct(self, x, zq=None):
        h = self.conv1(self._norm_silu(self.norm1, x, zq))
        h = self.conv2(self._norm_silu(self.norm2, h, zq))  # dropout 0 at inference
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        if _host(h):
            h += x  # h is the conv's fresh output
            out = h
        else:
            out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Cell):
    """Stride-2 3x3 conv after padding right and bottom by one (diffusers padding=0 variant)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = layers.Conv2d(channels, channels, 3, stride=2)

    def construct(self, x):
        if not _host(x):
            return self.conv(ops.pad(x, (0, 1, 0, 1)))
        bias = None if self.conv.bias is None else _np(self.conv.bias)
        padded = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))
        return conv2d_host(padded, _np(self.conv.weight), bias, 2, 0)


class Upsample2D(nn.Cell):
    """Nearest 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2dSame(channels, channels, 3)

    def construct(self, x):
        b, c, h, w = x.shape
        if not _host(x):
            return self.conv(interpolate_nearest(x, (2 * h, 2 * w)))
        # Each pixel written four times straight into the zero-padded buffer the conv reads
        # (one copy instead of upsample, then pad).
        padded = np.zeros((b, c, 2 * h + 3, 2 * w + 2), dtype=np.float32)  # pad_flat_numpy layout
        for dy in (1, 2):
            for dx in (1, 2):
                padded[:, :, dy:dy + 2 * h:2, dx:dx + 2 * w:2] = x
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
            interrupt.check()  # the full-resolution blocks take seconds: a Stop need not wait
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
        return self.conv_out(self.conv_norm_out(x, act=True))


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
        if self.spatial:
            x = self.conv_norm_out(x, zq, act=True)
        else:
            x = self.conv_norm_out(x, act=True)
        return self.conv_out(x)


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
        h = self.quant_conv(self.encoder(self._to_host(x)))
        return {"latents": self._from_host(h, x.dtype)}

    def decode(self, latents, force_not_quantize: bool = False) -> dict:
        """latents (B, vq_embed_dim, h, w) -> {"sample": (B, out_channels, h*f, w*f)}.

        `force_not_quantize=False` (diffusers' default) first snaps each latent pixel to its
        nearest codebook vector; the Kandinsky pipelines pass True.
        """
        self._check_input("latents", latents, self.config.vq_embed_dim or self.config.latent_channels)
        quant = latents if force_not_quantize else self.quantize(latents)[0]
        quant = self._to_host(quant)
        x = self.post_quant_conv(quant)
        zq = quant if self.config.norm_type == "spatial" else None
        return {"sample": self._from_host(self.decoder(x, zq), latents.dtype)}

    @staticmethod
    def _to_host(x):
        """On CPU: the Tensor's float32 numpy view (a copy only for other dtypes)."""
        if not on_cpu():
            return x
        array = x.asnumpy()
        return array if array.dtype == np.float32 else array.astype(np.float32)

    @staticmethod
    def _from_host(x, dtype):
        if not _host(x):
            return x
        out = Tensor.from_numpy(np.ascontiguousarray(x))  # shares the array's memory
        return out if dtype == ms.float32 else out.astype(dtype)

    def construct(self, x):
        return self.decode(self.encode(x)["latents"])["sample"]

    @staticmethod
    def _check_input(name: str, x, channels: int) -> None:
        if len(x.shape) != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must have shape (B, {channels}, H, W); got {tuple(x.shape)}")
