"""What every layer shares: which path an array is on, parameters, and the few array operations
the models write between layers (matmul, concatenation, the in-place residual add)."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

from backend.nn.host import BFLOAT16, host_matmul


def is_host(x) -> bool:
    """True for a numpy array: the layer computes on the host path."""
    return isinstance(x, np.ndarray)


def host_param(param) -> np.ndarray:
    """float32 numpy view of a parameter or array (on CPU asnumpy() shares the memory;
    half-precision weights are converted, a copy)."""
    array = param if is_host(param) else param.asnumpy()
    return array if array.dtype == np.float32 else array.astype(np.float32)


def host_weight(param) -> np.ndarray:
    """numpy view of a product's weight as stored: float32, or bfloat16, whose products then run in
    bfloat16 with float32 accumulation (backend/nn/host.py); float16 weights are converted."""
    array = param if is_host(param) else param.asnumpy()
    return array if array.dtype in (np.float32, BFLOAT16) else array.astype(np.float32)


# torch.finfo(dtype).min, the "minus infinity" transformers writes into additive attention masks
# (numpy has no bfloat16: its min is -(2 - 2^-7) * 2^127, exact in float32 as every value here).
_FINFO_MIN = {ms.float16: np.float32(np.finfo(np.float16).min), ms.bfloat16: np.float32(-(2 - 2 ** -7) * 2.0 ** 127),
              ms.float32: np.finfo(np.float32).min}


def finfo_min(dtype) -> np.float32:
    """torch.finfo(dtype).min for a MindSpore float dtype, as a float32 number."""
    return _FINFO_MIN[dtype]


def as_dtype(param, dtype):
    """The device path computes in its input's dtype (T5 keeps half-precision weights and computes
    in float32)."""
    return param if param.dtype == dtype else param.astype(dtype)


# Parameters start as zeros (or ones for norm scales): real values always come from a checkpoint,
# and MindSpore allocates an initializer's memory only when it is filled, so building a
# 3-billion-parameter model costs nothing.
def zeros_parameter(shape, dtype=ms.float32) -> Parameter:
    return Parameter(initializer("zeros", tuple(shape), dtype))


def ones_parameter(shape, dtype=ms.float32) -> Parameter:
    return Parameter(initializer("ones", tuple(shape), dtype))


def matmul(a, b):
    """a @ b for numpy arrays (oneDNN's sgemm, backend/nn/host.py) or Tensors."""
    return host_matmul(a, b) if is_host(a) else ops.matmul(a, b)


def concat(arrays, axis: int):
    """torch.cat for numpy arrays or Tensors (all of one kind)."""
    if is_host(arrays[0]):
        return np.concatenate(arrays, axis=axis)
    return ops.concat(arrays, axis=axis)


def add_(fresh, other):
    """fresh + other; on the host path written into `fresh`, which must be an array the caller
    owns (a layer's new output), so the residual adds allocate nothing."""
    if is_host(fresh):
        fresh += other
        return fresh
    return fresh + other


class Identity(nn.Cell):
    """torch nn.Identity: the placeholders diffusers keeps in its ModuleLists (no parameters; keeps
    the indices of the checkpoint keys)."""

    def construct(self, x, *args, **kwargs):
        return x
