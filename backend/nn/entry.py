"""The two execution paths, and the one entry every model goes through.

Two execution paths. Every layer in backend/nn takes either a numpy array or a MindSpore Tensor
and returns the same kind:
- host path (CPU): activations are float32 numpy arrays from a model's input to its output; the
  heavy products run through the oneDNN that MindSpore bundles (backend/nn/host.py: sgemm,
  convolutions as im2col in cache-sized bands, whole samples per core), the rest in numpy.
- device path (GPU, Ascend; or CPU with `cpu_numpy_path = False`): Tensors through the portable
  `mindspore.ops` API, which has GPU and Ascend kernels.
Why two: on CPU, MindSpore 2.10's PyNative kernels are slow and uneven on large activations.
Measured here on (2, 384, 64, 64) float32 with other work on the machine: group norm 90-2000 ms
(numpy 15 ms, torch 12 ms), add 7 ms (numpy 0.7 ms), silu 4-660 ms; its CPU conv2d runs at about
0.6 GFLOP/s against ~200 for im2col + oneDNN's sgemm (docs/PERFORMANCE.md). Parameters stay
MindSpore Parameters either way; the host path reads them with asnumpy(), which on CPU is a view
of the same memory.

A model picks the path once, at its entry (`run_model`), and a layer never mixes the two.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from backend.device import on_cpu
from backend.nn.conv import Conv2d, ConvTranspose2d
from backend.nn.host import split_batch
from backend.nn.linear import Embedding, Linear


# Token tables (CLIP's 49408 x 1280, XLM-R's 250002 x 1024) are memory; a row is read, not multiplied
# into a product of its own, and the next product rounds it to bfloat16 anyway.
EMBEDDING_TABLE_ELEMENTS = 1 << 20


class Model(nn.Cell):
    """Base of every model: the switch between the two execution paths."""

    # False runs the mindspore.ops (device) path on CPU too; the tests check both paths with it.
    cpu_numpy_path = True

    @property
    def host_path(self) -> bool:
        return self.cpu_numpy_path and on_cpu()

    @property
    def dtype(self):
        """The dtype of the model's weights: half precision if any weight is stored so (a bfloat16
        model keeps its small parameters in float32, see bfloat16_parameter_names)."""
        for param in self.get_parameters():
            if param.dtype in (ms.float16, ms.bfloat16):
                return param.dtype
        return ms.float32

    def bfloat16_parameter_names(self) -> set[str]:
        """The parameters a bfloat16 load rounds: the weights of products (Linear, Conv2d,
        ConvTranspose2d) and embedding tables over EMBEDDING_TABLE_ELEMENTS entries, nearly all the
        bytes. The rest (norm scales, biases, position and class embeddings, the MoVQ codebook) stay
        float32, as torch's bfloat16 autocast keeps them: measured on the tiny fixtures, rounding
        them too made CLIP, MCLIP and the prior up to 1.45x torch's error, and moved quantized MoVQ
        decodes to other codebook entries (2.5-4.8x torch's error)."""
        names = set()
        for prefix, cell in self.cells_and_names():
            if isinstance(cell, (Linear, Conv2d, ConvTranspose2d)):
                names.add(f"{prefix}.weight" if prefix else "weight")
            elif isinstance(cell, Embedding) and cell.weight.size > EMBEDDING_TABLE_ELEMENTS:
                names.add(f"{prefix}.weight" if prefix else "weight")
        return names


    @property
    def compute_dtype(self):
        """The dtype the current path computes in: float32 on the host path, the parameters' dtype on
        the device path (a model that always computes in float32 sets this to ms.float32)."""
        return ms.float32 if self.host_path else self.dtype


_FLOATS = (ms.float16, ms.bfloat16, ms.float32, ms.float64)
_INTEGERS = (ms.int8, ms.int16, ms.int32, ms.int64, ms.uint8, ms.uint16, ms.uint32, ms.uint64)


def _tree_map(fn, value):
    if isinstance(value, dict):
        return {k: _tree_map(fn, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_tree_map(fn, v) for v in value)
    return fn(value)


def to_host(x):
    """Float inputs as float32 numpy arrays (a Tensor's asnumpy() is a view on CPU); integer
    Tensors as numpy arrays; anything else unchanged."""
    if isinstance(x, Tensor):
        x = x.asnumpy()
    if isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.dtype != np.float32:
        return x.astype(np.float32)
    return x


def to_device(x, dtype):
    """Float arrays as Tensors of `dtype`; integer arrays as int32 Tensors (what the device path's
    gathers take); anything else unchanged."""
    if isinstance(x, np.ndarray) and x.dtype.kind in "fiu":
        x = Tensor(np.ascontiguousarray(x, dtype=np.float32 if x.dtype.kind == "f" else np.int32))
    if isinstance(x, Tensor):
        if x.dtype in _FLOATS and x.dtype != dtype:
            return x.astype(dtype)
        if x.dtype in _INTEGERS and x.dtype != ms.int32:
            return x.astype(ms.int32)
    return x


def run_model(model: Model, forward: Callable, *inputs, split_samples: bool = True):
    """forward(*inputs) on the model's execution path.

    `inputs` are numpy arrays, Tensors, numbers, None, or dicts / lists / tuples of them. On the
    host path every array reaches `forward` as a numpy array (floats as float32); on the device
    path float arrays become Tensors of the model's `compute_dtype`, integer arrays (token ids,
    position tables) int32 Tensors. A model's own index logic (masks, positions) runs on numpy
    before this call.

    On the host path with `split_samples`, whole samples go to each core (backend/nn/host.py
    `split_batch`): every array input whose first axis is the batch (the first array's) is cut
    along it, and `forward` must return an array, or a tuple of arrays, with samples along axis 0.

    Returns what `forward` returns: numpy float32 arrays on the host path, Tensors on the device
    path.
    """
    if model.host_path:
        inputs = _tree_map(to_host, inputs)
        batch = _first_batch(inputs)
        if split_samples and batch is not None:
            def rows(start: int, stop: int):
                def cut(x):
                    if isinstance(x, np.ndarray) and x.ndim and x.shape[0] == batch:
                        return x[start:stop]
                    return x
                return _tree_map(cut, inputs)

            out = split_batch(batch, lambda start, stop: forward(*rows(start, stop)))
            if out is not None:
                return out
        return forward(*inputs)
    return forward(*_tree_map(lambda x: to_device(x, model.compute_dtype), inputs))


def _first_batch(inputs) -> int | None:
    found = []

    def look(x):
        if not found and isinstance(x, np.ndarray) and x.ndim:
            found.append(x.shape[0])
        return x

    _tree_map(look, inputs)
    return found[0] if found else None
