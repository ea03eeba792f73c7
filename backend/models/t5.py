"""T5 encoder (Kandinsky 3's text encoder: the Flan-UL2 encoder, 8.7B parameters).

Port of transformers 4.57.1 `T5EncoderModel` (transformers/models/t5/modeling_t5.py), inference
only: RMS-style `T5LayerNorm` (nn's RMSNorm: no mean, no bias), attention without the 1/sqrt(d) scale and
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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from backend import interrupt
from backend.nn import (ACTIVATIONS, Embedding, Linear, Model, RMSNorm, finfo_min, get_activation, is_host, run_model,
                        scaled_dot_product_attention)


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
        if result.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"T5EncoderModel config: dense_act_fn must be one of {sorted(ACTIVATIONS)}; "
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
    last_hidden_state: np.ndarray | Tensor  # (B, L, d_model), after the final layer norm


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
        self.q = Linear(config.d_model, self.inner_dim, bias=False)
        self.k = Linear(config.d_model, self.inner_dim, bias=False)
        self.v = Linear(config.d_model, self.inner_dim, bias=False)
        self.o = Linear(self.inner_dim, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(config.relative_attention_num_buckets, self.n_heads)

    def compute_bias(self, buckets):
        """(1, L, L) relative-position buckets -> (1, heads, L, L) float32 bias."""
        values = self.relative_attention_bias(buckets).astype(np.float32)  # (1, L, L, h)
        return values.transpose(0, 3, 1, 2)

    def construct(self, hidden_states, position_bias):
        b, n, _ = hidden_states.shape  # (B, L, C)
        q, k, v = (proj(hidden_states).reshape(b, n, self.n_heads, self.key_value_proj_dim).swapaxes(1, 2)
                   for proj in (self.q, self.k, self.v))  # (B, h, L, d)
        out = scaled_dot_product_attention(q, k, v, position_bias, scale=1.0)  # no 1/sqrt(d) in T5
        return self.o(out.swapaxes(1, 2).reshape(b, n, self.inner_dim))


class T5LayerSelfAttention(nn.Cell):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def construct(self, hidden_states, position_bias):
        return hidden_states + self.SelfAttention(self.layer_norm(hidden_states), position_bias)


class T5DenseGatedActDense(nn.Cell):
    """act(wi_0 x) * wi_1 x, then wo."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.act = get_activation(config.dense_act_fn)
        self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)

    def construct(self, x):
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nn.Cell):
    """act(wi x), then wo."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.act = get_activation(config.dense_act_fn)
        self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)

    def construct(self, x):
        return self.wo(self.act(self.wi(x)))


class T5LayerFF(nn.Cell):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated_act else T5DenseActDense(config)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def construct(self, hidden_states):
        return hidden_states + self.DenseReluDense(self.layer_norm(hidden_states))


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
        self.final_layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def construct(self, hidden_states, position_buckets, padding_mask=None):
        """hidden_states (B, L, C) float32, position_buckets (1, L, L), padding_mask additive (B, 1, 1, L)."""
        # The first layer's bias table serves every layer; the padding mask is added to it once, as
        # transformers does.
        bias = self.block[0].layer[0].SelfAttention.compute_bias(position_buckets)  # (1, h, L, L)
        if padding_mask is not None:
            bias = bias + padding_mask  # (B, h, L, L)
        for block in self.block:
            hidden_states = block(hidden_states, bias)
            interrupt.check()  # 32 layers of 8.7B parameters: a Stop takes effect between layers
        return self.final_layer_norm(hidden_states)


class T5EncoderModel(Model):
    """transformers `T5EncoderModel`: input_ids (B, L) [+ attention_mask] -> last_hidden_state."""

    compute_dtype = ms.float32  # whatever the weights' dtype (module docstring)

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    @classmethod
    def from_config(cls, config: dict) -> "T5EncoderModel":
        return cls(T5Config.from_dict(config))

    def construct(self, input_ids, attention_mask=None) -> T5EncoderOutput:
        """input_ids (B, L) int; attention_mask (B, L) with 1 = token, 0 = padding (optional).

        Computed in float32 whatever the weights' dtype (see the module docstring). Returns
        last_hidden_state (B, L, d_model): float32 numpy on the host path, a Tensor of the model's
        dtype on the device path, as transformers returns it (backend/nn/entry.py run_model)."""
        ids = np.asarray(input_ids)
        ids = ids.reshape(-1, ids.shape[-1])  # (B, L)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}); "
                             f"got values in [{ids.min()}, {ids.max()}]")
        batch, length = ids.shape
        positions = np.arange(length, dtype=np.int64)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None],  # key minus query position
                                           self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)[None]  # (1, L, L)
        padding = None
        if attention_mask is not None:  # (1 - mask) * finfo(dtype).min, as transformers builds it
            keep = np.asarray(attention_mask).reshape(batch, 1, 1, length).astype(np.float32)
            padding = (1.0 - keep) * finfo_min(self.compute_dtype)
        # Few tokens against large weights: each product is split over the cores (a core reads, and
        # widens, part of the weights), not the samples (every core would read all of them).
        out = run_model(self, self._forward, ids, buckets, padding, split_samples=False)
        return T5EncoderOutput(out if is_host(out) else out.astype(self.dtype))

    def _forward(self, input_ids, position_buckets, padding_mask):
        hidden_states = self.shared(input_ids).astype(np.float32)  # (B, L, C); half-precision tables widened
        return self.encoder(hidden_states, position_buckets, padding_mask)
