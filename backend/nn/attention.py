"""Scaled dot-product attention: the one kernel every attention block calls."""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import ops

from backend.nn.core import is_host
from backend.nn.host import MIN_PARALLEL_ELEMENTS, host_gemm, host_matmul

# Largest block of attention scores materialized at once: 2**24 float32 scores, 64 MB. Without a
# bound, Kandinsky 3's 64x64-token self-attention at 1024x1024 holds 12 heads x 4096^2 scores
# (805 MB) per sample, and the MoVQ's single-head attention at 768x768 9216^2 (340 MB).
SCORE_BLOCK_ELEMENTS = 1 << 24


def scaled_dot_product_attention(q, k, v, mask=None, scale: float | None = None, channels_first: bool = False):
    """softmax(q k^T * scale + mask) v, numpy arrays or Tensors.

    q (..., Lq, D), k (..., Lk, D), v (..., Lk, Dv) -> (..., Lq, Dv); with `channels_first`
    q (..., D, Lq), k (..., D, Lk), v (..., Dv, Lk) -> (..., Dv, Lq), the layout of NCHW feature
    maps and of `Linear.channels_first` projections, so they need no transposes.
    `mask` is additive (0 keeps, large negative drops) and broadcasts to (..., Lq, Lk). `scale`
    defaults to 1/sqrt(D); 1.0 skips the multiply (for a query scaled beforehand).

    Scores are computed in blocks of at most SCORE_BLOCK_ELEMENTS: whole heads, or rows of queries
    of one head (each row's softmax still sees all its keys, so blocks change nothing but float32
    rounding in the products). On the host path the blocks of a large attention run in parallel
    over the cores, one block per core at a time, so the softmax is spread too.
    """
    if channels_first:
        q, k, v = q.swapaxes(-1, -2), k.swapaxes(-1, -2), v.swapaxes(-1, -2)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if is_host(q):
        lead = q.shape[:-2]
        out = np.empty((*lead, v.shape[-1], q.shape[-2]) if channels_first else (*lead, q.shape[-2], v.shape[-1]),
                       np.float32)
        _attention_host(q, k, v, mask, scale, out.swapaxes(-1, -2) if channels_first else out)
        return out
    out = _attention_device(q, k, v, mask, scale)
    return out.swapaxes(-1, -2) if channels_first else out


def _attention_device(q, k, v, mask, scale: float):
    lead, lq, lk = q.shape[:-2], q.shape[-2], k.shape[-2]
    rows = max(1, SCORE_BLOCK_ELEMENTS // (math.prod(lead) * lk))
    if rows < lq:  # query blocks; the mask follows its query rows when it has them
        outs = []
        for start in range(0, lq, rows):
            block_mask = mask if mask is None or mask.shape[-2] == 1 else mask[..., start:start + rows, :]
            outs.append(_attention_device(q[..., start:start + rows, :], k, v, block_mask, scale))
        return ops.concat(outs, axis=-2)
    scores = ops.matmul(q, k.swapaxes(-1, -2))
    if scale != 1.0:
        scores = scores * scale
    if mask is not None:
        scores = scores + mask
    probs = ops.softmax(scores.astype(ms.float32), axis=-1).astype(v.dtype)
    return ops.matmul(probs, v)


def _attention_host(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask, scale: float, out: np.ndarray) -> None:
    """Writes the attention of q (..., Lq, D) into `out` (..., Lq, Dv). q/k/v/out may be strided
    views such as x.reshape(B, N, h, d).transpose(0, 2, 1, 3): sgemm reads and writes them in
    place, no copies. Blocks: groups of whole heads along the last leading axis, or, when one
    head's scores exceed SCORE_BLOCK_ELEMENTS, blocks of query rows of one head."""
    lead, lq, lk = q.shape[:-2], q.shape[-2], k.shape[-2]
    if (not lead or math.prod(lead) * lq * lk < MIN_PARALLEL_ELEMENTS or k.shape[:-2] != lead
            or v.shape[:-2] != lead):
        _attention_block(q, k, v, mask, scale, out, split=True)  # small: one block on this thread
        return
    if mask is not None:
        mask = np.broadcast_to(mask, np.broadcast_shapes(mask.shape, (*lead, 1, 1)))
    *outer, heads = lead
    if lq * lk <= SCORE_BLOCK_ELEMENTS:
        group, rows = max(1, SCORE_BLOCK_ELEMENTS // (lq * lk)), lq
    else:
        group, rows = 1, max(1, SCORE_BLOCK_ELEMENTS // lk)
    blocks = [(index, slice(h, h + group), slice(r, r + rows))
              for index in np.ndindex(*outer) for h in range(0, heads, group) for r in range(0, lq, rows)]

    def one(i: int) -> None:
        index, hs, rs = blocks[i]
        block_mask = None
        if mask is not None:
            block_mask = mask[index][hs]
            block_mask = block_mask if block_mask.shape[-2] == 1 else block_mask[:, rs]
        _attention_block(q[index][hs, rs], k[index][hs], v[index][hs], block_mask, scale, out[index][hs, rs],
                         split=len(blocks) == 1)

    host_gemm().parallel(len(blocks), one)


def _attention_block(q, k, v, mask, scale: float, out: np.ndarray, split: bool) -> None:
    scores = host_matmul(q, k.swapaxes(-1, -2), split=split)  # (..., Lq, Lk)
    if scale != 1.0:
        scores *= np.float32(scale)
    if mask is not None:
        scores += mask
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    sums = scores.sum(axis=-1, keepdims=True)
    host_matmul(scores, v, out=out, split=split)
    # the softmax's normalization after the product: Lq x Dv divisions instead of Lq x Lk (measured
    # 8.3 ms of ~25 ms of softmax on 12 heads x 1024 x 1028 scores)
    out /= sums
