"""T5 encoder (Kandinsky 3's text encoder: the Flan-UL2 encoder, 8.7B parameters).

Port of transformers 4.57.1 `T5EncoderModel` (transformers/models/t5/modeling_t5.py), inference
only: RMS-style `T5LayerNorm` (no mean, no bias), attention without the 1/sqrt(d) scale and
with a learned relative-position bias that only the first layer owns and every layer reuses,
gated (or plain) feed-forward, no biases anywhere. Attribute paths equal the checkpoint keys
(`shared.weight`, `encoder.block.0.layer.0.SelfAttention.q.weight`,
`encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`,
`encoder.block.0.layer.1.DenseReluDense.wi_0.weight`, `encoder.final_layer_norm.weight`), so
`backend.weights.load_model(T5EncoderModel, folder)` is the identity map. transformers ties
`encoder.embed_tokens` to `shared` and does not save it; here the encoder reads `shared`.

Precision ("T5 precision issues"): T5 v1.1 / Flan activations grow past float16's range in the
feed-forward output; transformers therefore keeps `wo` in float32 (`_keep_in_fp32_modules`) and
clamps infinities in float16. This port never computes in half precision: half-precision
weights (e.g. the published `variant="fp16"` shards) halve the memory, and every product and
the residual stream run in float32 (weights are widened at use). Measured on the parity fixture
in tests/test_t5.py: fp16 weights vs fp32 weights, see that test's docstring.

Two execution paths as in clip.py: on CPU numpy arrays with products through
backend/nn/host.py; on GPU/Ascend (or `cpu_numpy_path = False`) mindspore.ops Tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from backend import interrupt
from backend.device import on_cpu
from backend.nn.host import host_matmul
from backend.nn.layers import Embedding, gelu, host_param, is_host, ones_parameter, silu, zeros_parameter

_ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")


@dataclass
class T5Config:
    """Fields of transformers' `T5Config` config.json that the encoder uses (defaults are transformers')."""

    vocab_size: int = 32128  # rows of `shared` (token embeddings)
    d_model: int = 512  # width of the residual stream
    d_kv: int = 64  # width of one attention head
    d_ff: int = 2048  # feed-forward hidden width
    num_layers: int = 6  # encoder blocks
    num_heads: int = 8  # heads per attention (inner width num_heads * d_kv)
    relative_attention_num_buckets: int = 32  # rows of the relative-position bias table
    relative_attention_max_distance: int = 128  # distance beyond which positions share the last bucket
    layer_norm_epsilon: float = 1e-6  # epsilon of every T5LayerNorm
    feed_forward_proj: str = "relu"  # "relu" | "gated-gelu" | "gated-silu" | ...: gating and activation
    dense_act_fn: str = ""  # activation; config.json's value wins over feed_forward_proj's, as in transformers
    is_gated_act: bool | None = None  # gated feed-forward (wi_0, wi_1); config.json's value wins too

    @classmethod
    def from_dict(cls, config: dict) -> "T5Config":
        known = {f.name for f in fields(cls)}
        result = cls(**{k: v for k, v in config.items() if k in known and not k.startswith("_")})
        parts = str(result.feed_forward_proj).split("-")
        if (len(parts) > 1 and parts[0] != "gated") or len(parts) > 2:
            raise ValueError(f"T5EncoderModel config: feed_forward_proj must be 'ACT' or 'gated-ACT'; "
                             f"got {result.feed_forward_proj!r}")
        # transformers' T5Config derives these from feed_forward_proj, then config.json's own keys overwrite them.
        derived_act = "gelu_new" if result.feed_forward_proj == "gated-gelu" else parts[-1]
        if not result.dense_act_fn:
            result.dense_act_fn = derived_act
        if result.is_gated_act is None:
            result.is_gated_act = parts[0] == "gated"
        if result.dense_act_fn not in _ACTIVATIONS:
            raise ValueError(f"T5EncoderModel config: dense_act_fn must be one of {list(_ACTIVATIONS)}; "
                             f"got {result.dense_act_fn!r}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(result, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"T5EncoderModel config: {name} must be a positive integer; got {value!r}")
        if result.relative_attention_num_buckets < 4:
            raise ValueError("T5EncoderModel config: relative_attention_num_buckets must be at least 4; "
                             f"got {result.relative_attention_num_buckets}")
        return result


class T5EncoderOutput(NamedTuple):
    last_hidden_state: Tensor  # (B, L, d_model), after the final layer norm


def _activation(name: str, x):
    if name == "silu":
        return silu(x)
    if name == "gelu":
        return gelu(x)
    if name == "gelu_new":
        return gelu(x, approximate="tanh")
    if is_host(x):  # relu
        return np.maximum(x, 0, out=x)
    return ops.relu(x)


def _f32(param):
    """A parameter as float32 for the ops path (half-precision weights are widened at use)."""
    return param if param.dtype == ms.float32 else param.astype(ms.float32)


class T5Linear(nn.Cell):
    """torch.nn.Linear without bias; always computes in float32 (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = zeros_parameter((out_features, in_features))

    def construct(self, x):
        shape = x.shape
        if is_host(x):
            y = host_matmul(x.reshape(-1, shape[-1]), host_param(self.weight).T)
        else:
            y = ops.matmul(x.reshape(-1, shape[-1]), _f32(self.weight).T)
        return y.reshape(*shape[:-1], self.out_features)


class T5LayerNorm(nn.Cell):
    """RMS norm: x / sqrt(mean(x^2) + eps) * weight, statistics in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = ones_parameter((hidden_size,))
        self.variance_epsilon = eps

    def construct(self, x):
        if is_host(x):
            variance = np.einsum("...i,...i->...", x, x)[..., None] / np.float32(x.shape[-1])
            y = x * (1 / np.sqrt(variance + np.float32(self.variance_epsilon)))
            y *= host_param(self.weight)
            return y
        variance = (x * x).mean(axis=-1, keep_dims=True)
        return _f32(self.weight) * (x * ops.rsqrt(variance + self.variance_epsilon))


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """transformers' T5Attention._relative_position_bucket, bidirectional (the encoder), in numpy.

    Half the buckets for keys after the query, half before; within each half, exact buckets for
    small distances, logarithmic ones up to max_distance. The log runs in float32 as in torch.
    """
    num_buckets //= 2
    buckets = (relative_position > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    with np.errstate(divide="ignore"):  # log(0) for distance 0 is discarded by is_small
        scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)  # .to(long) truncates toward zero
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, distance, large)


class T5Attention(nn.Cell):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.n_heads = config.num_heads
        self.key_value_proj_dim = config.d_kv
        self.inner_dim = config.num_heads * config.d_kv
        self.has_relative_attention_bias = has_relative_attention_bias
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = T5Linear(config.d_model, self.inner_dim)
        self.k = T5Linear(config.d_model, self.inner_dim)
        self.v = T5Linear(config.d_model, self.inner_dim)
        self.o = T5Linear(self.inner_dim, config.d_model)
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(self.num_buckets, self.n_heads)

    def compute_bias(self, length: int, host: bool):
        """(1, heads, L, L) bias from key position minus query position."""
        positions = np.arange(length, dtype=np.int64)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.num_buckets,
                                           self.max_distance)  # (L, L)
        if host:
            return host_param(self.relative_attention_bias.weight)[buckets].transpose(2, 0, 1)[None]
        values = ops.gather(_f32(self.relative_attention_bias.weight), Tensor(buckets.astype(np.int32)), 0)
        return values.transpose(2, 0, 1)[None]  # (L, L, h) -> (1, h, L, L)

    def construct(self, hidden_states, position_bias):
        b, n, _ = hidden_states.shape  # (B, L, C)
        h, d = self.n_heads, self.key_value_proj_dim
        if is_host(hidden_states):
            q, k, v = (proj(hidden_states).reshape(b, n, h, d).transpose(0, 2, 1, 3)
                       for proj in (self.q, self.k, self.v))  # (B, h, L, d) views
            scores = host_matmul(q, k.swapaxes(-1, -2))  # (B, h, L, L), no 1/sqrt(d) in T5
            scores += position_bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            out = host_matmul(scores, v)  # (B, h, L, d)
            return self.o(out.transpose(0, 2, 1, 3).reshape(b, n, self.inner_dim))
        q = self.q(hidden_states).reshape(b, n, h, d).swapaxes(1, 2)  # (B, h, L, d)
        k = self.k(hidden_states).reshape(b, n, h, d).swapaxes(1, 2)
        v = self.v(hidden_states).reshape(b, n, h, d).swapaxes(1, 2)
        scores = ops.matmul(q, k.swapaxes(-1, -2)) + position_bias
        out = ops.matmul(ops.softmax(scores, axis=-1), v)
        return self.o(out.swapaxes(1, 2).reshape(b, n, self.inner_dim))


class T5LayerSelfAttention(nn.Cell):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def construct(self, hidden_states, position_bias):
        out = self.SelfAttention(self.layer_norm(hidden_states), position_bias)
        if is_host(out):
            out += hidden_states
            return out
        return hidden_states + out


class T5DenseGatedActDense(nn.Cell):
    """act(wi_0 x) * wi_1 x, then wo."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.act = config.dense_act_fn
        self.wi_0 = T5Linear(config.d_model, config.d_ff)
        self.wi_1 = T5Linear(config.d_model, config.d_ff)
        self.wo = T5Linear(config.d_ff, config.d_model)

    def construct(self, x):
        gate = _activation(self.act, self.wi_0(x))
        if is_host(gate):
            gate *= self.wi_1(x)
            return self.wo(gate)
        return self.wo(gate * self.wi_1(x))


class T5DenseActDense(nn.Cell):
    """act(wi x), then wo."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.act = config.dense_act_fn
        self.wi = T5Linear(config.d_model, config.d_ff)
        self.wo = T5Linear(config.d_ff, config.d_model)

    def construct(self, x):
        return self.wo(_activation(self.act, self.wi(x)))


class T5LayerFF(nn.Cell):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated_act else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def construct(self, hidden_states):
        out = self.DenseReluDense(self.layer_norm(hidden_states))
        if is_host(out):
            out += hidden_states
            return out
        return hidden_states + out


class T5Block(nn.Cell):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.CellList([T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)])

    def construct(self, hidden_states, position_bias):
        return self.layer[1](self.layer[0](hidden_states, position_bias))


class T5Stack(nn.Cell):
    """The encoder stack; its token embeddings are the model's `shared` table (tied, not saved)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.block = nn.CellList([T5Block(config, has_relative_attention_bias=(i == 0))
                                  for i in range(config.num_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def construct(self, hidden_states, attention_mask: np.ndarray | None):
        b, n = hidden_states.shape[:2]
        host = is_host(hidden_states)
        # The first layer's bias table, shared by all layers, plus the padding mask (B, 1, 1, L),
        # added once as transformers does: (1 - mask) * finfo(float32).min.
        bias = self.block[0].layer[0].SelfAttention.compute_bias(n, host)  # (1, h, L, L)
        if attention_mask is not None:
            padding = (1.0 - attention_mask.astype(np.float32)) * np.finfo(np.float32).min
            padding = padding.reshape(b, 1, 1, n).astype(np.float32)
            bias = bias + (padding if host else Tensor(padding))
        for block in self.block:
            hidden_states = block(hidden_states, bias)
            interrupt.check()  # 32 layers of 8.7B parameters: a Stop takes effect between layers
        return self.final_layer_norm(hidden_states)


class T5EncoderModel(nn.Cell):
    """transformers `T5EncoderModel`: input_ids (B, L) [+ attention_mask] -> last_hidden_state."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    @classmethod
    def from_config(cls, config: dict) -> "T5EncoderModel":
        return cls(T5Config.from_dict(config))

    @property
    def dtype(self):
        return self.shared.weight.dtype

    cpu_numpy_path = True

    def construct(self, input_ids, attention_mask=None) -> T5EncoderOutput:
        """input_ids (B, L) int; attention_mask (B, L) with 1 = token, 0 = padding (optional).

        Returns last_hidden_state (B, L, d_model) in the model's dtype (computed in float32)."""
        ids = input_ids.asnumpy() if isinstance(input_ids, Tensor) else np.asarray(input_ids)
        ids = ids.reshape(-1, ids.shape[-1])  # (B, L)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}); "
                             f"got values in [{ids.min()}, {ids.max()}]")
        if attention_mask is not None:
            attention_mask = (attention_mask.asnumpy() if isinstance(attention_mask, Tensor)
                              else np.asarray(attention_mask)).reshape(ids.shape)
        if self.cpu_numpy_path and on_cpu():
            hidden_states = self.shared(ids.astype(np.int64))  # (B, L, C) float32 numpy
            out = Tensor.from_numpy(np.ascontiguousarray(self.encoder(hidden_states, attention_mask)))
        else:
            hidden_states = self.shared(Tensor(ids.astype(np.int32))).astype(ms.float32)
            out = self.encoder(hidden_states, attention_mask)
        return T5EncoderOutput(out if self.dtype == ms.float32 else out.astype(self.dtype))
