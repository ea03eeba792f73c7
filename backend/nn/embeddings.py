"""Timestep embeddings (diffusers models/embeddings.py): the sinusoidal `Timesteps` and the MLP
`TimestepEmbedding`."""
from __future__ import annotations

import math

import numpy as np
from mindspore import Tensor, nn

from backend.nn.activations import get_activation
from backend.nn.linear import Linear


def batch_timesteps(timestep, batch: int) -> np.ndarray:
    """A diffusion timestep as a model call takes it (a number, or a 0-d / (1,) / (B,) numpy array
    or Tensor) -> (B,) numpy array, one value per sample."""
    t = np.asarray(timestep.asnumpy() if isinstance(timestep, Tensor) else timestep)
    if t.dtype.kind not in "iuf":
        raise ValueError(f"timestep must be a number or a numeric tensor; got dtype {t.dtype}")
    t = t.reshape(-1)
    if t.size == 1:
        return np.repeat(t, batch)
    if t.size != batch:
        raise ValueError(f"timestep must be a scalar or have one value per sample ({batch}); got {t.size} values")
    return t


def get_timestep_embedding(timesteps: np.ndarray, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1, scale: float = 1,
                           max_period: int = 10000) -> np.ndarray:
    """Sinusoidal embedding (N,) -> (N, embedding_dim) float32, as diffusers computes it.

    Every intermediate is rounded to float32 where torch's is. exp/sin/cos are evaluated in
    float64 and rounded: correctly rounded values, which differ from torch's float32 kernels by
    at most one unit in the last place (measured: 4 of 192 frequencies).
    """
    half_dim = embedding_dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half_dim, dtype=np.float32)
    exponent = exponent / np.float32(half_dim - downscale_freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    angles = np.asarray(timesteps).astype(np.float32)[:, None] * freqs[None, :]  # (N, half)
    angles = np.float32(scale) * angles
    emb = np.concatenate([np.sin(angles.astype(np.float64)), np.cos(angles.astype(np.float64))],
                         axis=-1).astype(np.float32)
    if flip_sin_to_cos:
        emb = np.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nn.Cell):
    """No parameters: (N,) timesteps (numpy) -> (N, num_channels) float32 numpy sinusoidal
    embedding (computed on the host on both paths; the model's entry converts it)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def construct(self, timesteps: np.ndarray) -> np.ndarray:
        return get_timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos,
                                      self.downscale_freq_shift)


class TimestepEmbedding(nn.Cell):
    """linear_1 -> act -> linear_2 [-> post_act]: (N, in_channels) -> (N, out_dim or time_embed_dim).
    Activations by diffusers' names (backend/nn/activations.py); its cond_proj is not ported (no
    model here has one)."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu", out_dim: int | None = None,
                 post_act_fn: str | None = None):
        super().__init__()
        self.linear_1 = Linear(in_channels, time_embed_dim)
        self.act = get_activation(act_fn)
        self.linear_2 = Linear(time_embed_dim, out_dim or time_embed_dim)
        self.post_act = get_activation(post_act_fn)

    def construct(self, sample):
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return sample if self.post_act is None else self.post_act(sample)
