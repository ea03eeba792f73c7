"""Activations, for numpy arrays (host path) or Tensors (device path)."""
from __future__ import annotations

import math

import numpy as np
from mindspore import nn, ops

from backend.nn.core import is_host
from backend.nn.host import MIN_PARALLEL_ELEMENTS, host_gemm
from backend.nn.linear import Linear


def silu(x):
    """x * sigmoid(x), a new array or Tensor."""
    if not is_host(x):
        return ops.silu(x)
    return _elementwise_host(x, _silu_chunk, _SILU_CHUNK_ELEMENTS)


def silu_(x):
    """silu written into `x` on the host path (an array the caller owns, e.g. a norm's fresh
    output); a new Tensor on the device path."""
    if not is_host(x):
        return ops.silu(x)
    return _elementwise_host(x, _silu_chunk, _SILU_CHUNK_ELEMENTS, in_place=True)


def _silu_chunk(x: np.ndarray) -> None:
    denominator = np.negative(x)
    with np.errstate(over="ignore"):  # exp(-x) -> inf for x << 0 gives x / inf = -0, as torch
        np.exp(denominator, out=denominator)
    denominator += 1
    np.divide(x, denominator, out=x)


class SiLU(nn.Cell):
    """torch nn.SiLU, for nn.Sequential-style lists whose indices are checkpoint keys."""

    def construct(self, x):
        return silu(x)


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
    return ops.mish(x)  # not tanh(ops.softplus(x)): MindSpore's CPU softplus is ~1% off for x << 0


class GELU(nn.Cell):
    """diffusers `GELU` (models/activations.py): a linear `proj`, then gelu (the first layer of its
    FeedForward, checkpoint key `ff.net.0.proj`)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.proj = Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def construct(self, x):
        return gelu(self.proj(x), approximate=self.approximate)


def gelu_tanh(x):
    """gelu with the tanh approximation (transformers `NewGELUActivation`, "gelu_pytorch_tanh")."""
    return gelu(x, approximate="tanh")


# One table for both vocabularies: transformers' ACT2FN names (the text encoders' hidden_act, T5's
# dense_act_fn) and diffusers' get_activation names (act_fn, time_embed_act_fn, ...), restricted
# to the functions ported here. Where both name a function they mean the same one ("gelu" is the
# exact erf gelu in both).
_ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": relu,
    "silu": silu,
    "swish": silu,
    "mish": mish,
}
ACTIVATIONS = frozenset(_ACTIVATIONS)  # the names get_activation takes, for config validation


def get_activation(name: str | None):
    """The activation function a transformers or diffusers config names (None: no activation)."""
    if name is None:
        return None
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    return _ACTIVATIONS[name]


# Element-wise activations on the host run in place over row chunks that stay in the CPU cache,
# spread over the cores (numpy releases the GIL): measured on a (162, 8192) float32 array,
# MindSpore's CPU gelu took 30 ms, one numpy pass per operation over the whole array ~40 ms,
# chunked and split over 2 cores ~10 ms.
_CHUNK_ELEMENTS = 16384
# silu's four passes: one core, 128 x 512 x 512 (a MoVQ layer): whole array 38 ms, chunks of 16384
# 32 ms, of 65536 25 ms (bit-identical)
_SILU_CHUNK_ELEMENTS = 65536


def _elementwise_host(x: np.ndarray, chunk_fn, chunk: int = _CHUNK_ELEMENTS, in_place: bool = False) -> np.ndarray:
    """chunk_fn (in place on a 1-D float32 chunk) over x: on a copy, or on x itself with `in_place`
    (x must then be a C-contiguous float32 array)."""
    if in_place and not (x.dtype == np.float32 and x.flags.c_contiguous):
        raise ValueError("in-place activations need a C-contiguous float32 array")
    out = x if in_place else np.array(x, dtype=np.float32, order="C", copy=True)
    flat = out.reshape(-1)
    chunks = -(-flat.size // chunk)

    def one(i: int) -> None:
        chunk_fn(flat[i * chunk:(i + 1) * chunk])

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
