"""The layer library: every layer once, its host (numpy) and device (mindspore.ops) paths side by
side. backend/nn/entry.py explains the two paths and holds the one entry models go through;
backend/nn/host.py holds the host kernels. Models import layers from here, by these names.

  core         is_host, host_param, parameters, matmul, concat, add_ (in-place residual), Identity,
               finfo_min (the masks' torch.finfo(dtype).min)
  linear       Linear (and its channels_first form), Embedding
  conv         Conv2d, ConvTranspose2d, conv2d
  norm         GroupNorm / group_norm (scale/shift and SiLU fused), SpatialNorm, LayerNorm, RMSNorm
  attention    scaled_dot_product_attention (one kernel, one score-block policy)
  activations  silu (silu_ in place), gelu, gelu_tanh, quick_gelu, relu, mish, GELU (proj + gelu);
               get_activation and ACTIVATIONS, the names transformers' and diffusers' configs use
  sampling     nearest up-sampling, 2x average pooling, Upsample2D, Downsample2D
  interpolate  torch's bilinear and bicubic resizing (interpolate_bilinear, interpolate_bicubic)
  embeddings   Timesteps, TimestepEmbedding, get_timestep_embedding
"""
from backend.nn.activations import (ACTIVATIONS, GELU, SiLU, gelu, gelu_tanh, get_activation, mish, quick_gelu, relu,
                                   silu, silu_)
from backend.nn.attention import scaled_dot_product_attention
from backend.nn.conv import Conv2d, ConvTranspose2d, conv2d
from backend.nn.core import (Identity, add_, as_dtype, concat, finfo_min, host_param, is_host, matmul,
                             ones_parameter, zeros_parameter)
from backend.nn.embeddings import TimestepEmbedding, Timesteps, batch_timesteps, get_timestep_embedding
from backend.nn.entry import Model, run_model
from backend.nn.interpolate import interpolate_bicubic, interpolate_bilinear
from backend.nn.linear import Embedding, Linear
from backend.nn.norm import GroupNorm, LayerNorm, RMSNorm, SpatialNorm, group_norm, layer_norm
from backend.nn.sampling import (Downsample2D, Upsample2D, avg_pool_2x, interpolate_nearest,
                                 torch_nearest_indices, upsample_nearest_2x)

__all__ = [
    "ACTIVATIONS", "Conv2d", "ConvTranspose2d", "Downsample2D", "Embedding", "GELU", "GroupNorm", "Identity",
    "LayerNorm", "Linear", "Model", "RMSNorm", "SiLU", "SpatialNorm", "TimestepEmbedding", "Timesteps",
    "Upsample2D", "add_", "as_dtype", "avg_pool_2x", "batch_timesteps", "concat", "conv2d", "finfo_min", "gelu",
    "gelu_tanh", "get_activation", "get_timestep_embedding", "group_norm", "host_param", "interpolate_bicubic",
    "interpolate_bilinear", "interpolate_nearest",
    "is_host", "layer_norm", "matmul", "mish", "ones_parameter", "quick_gelu", "relu", "run_model",
    "scaled_dot_product_attention", "silu", "silu_", "torch_nearest_indices", "upsample_nearest_2x",
    "zeros_parameter",
]
