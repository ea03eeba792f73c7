"""torch.nn.Linear and torch.nn.Embedding, with torch's parameter names."""
from __future__ import annotations

import numpy as np
from mindspore import nn, ops

from backend.nn.core import as_dtype, host_param, host_weight, is_host, zeros_parameter
from backend.nn.host import host_matmul

_bias_add = ops.BiasAdd()  # adds a (C,) vector along axis 1


class Linear(nn.Cell):
    """torch.nn.Linear: weight (out, in), bias (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = zeros_parameter((out_features, in_features))
        self.bias = zeros_parameter((out_features,)) if bias else None

    def construct(self, x):
        """(..., in) -> (..., out)."""
        shape = x.shape
        if is_host(x):
            # weight.T is a transposed view: sgemm reads it as such, no copy
            y = host_matmul(x.reshape(-1, shape[-1]), host_weight(self.weight).T)
            if self.bias is not None:
                y += host_param(self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        y = ops.matmul(x.reshape(-1, shape[-1]), as_dtype(self.weight, x.dtype).T)
        if self.bias is not None:
            y = y + as_dtype(self.bias, x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def channels_first(self, x):
        """(B, in, N) -> (B, out, N): weight @ x, a 1x1 convolution, so NCHW feature maps need no
        transposes."""
        if is_host(x):
            y = host_matmul(host_weight(self.weight), x)
            if self.bias is not None:
                y += host_param(self.bias)[:, None]
            return y
        y = ops.matmul(as_dtype(self.weight, x.dtype), x)
        return y if self.bias is None else _bias_add(y, as_dtype(self.bias, x.dtype))


class Embedding(nn.Cell):
    """torch.nn.Embedding: weight (num_embeddings, dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = zeros_parameter((num_embeddings, embedding_dim))

    def construct(self, ids):
        if is_host(ids):  # integer ids as numpy: a host row lookup
            return host_weight(self.weight)[ids].astype(np.float32)
        return ops.gather(self.weight, ids, 0)
