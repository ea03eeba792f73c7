"""The layer library: every layer once, its host (numpy) and device (mindspore.ops) paths side by
side. backend/nn/entry.py explains the two paths and holds the one entry models go through;
backend/nn/host.py holds the host kernels. Models import layers from here, by these names."""
from backend.nn.activations import SiLU, gelu, get_activation, mish, quick_gelu, relu, silu, silu_
from backend.nn.attention import SCORE_BLOCK_ELEMENTS, scaled_dot_product_attention
from backend.nn.conv import Conv2d, ConvTranspose2d, conv2d
from backend.nn.core import (Identity, add_, as_dtype, concat, host_param, is_host, matmul, ones_parameter,
                             zeros_parameter)
from backend.nn.embeddings import TimestepEmbedding, Timesteps, batch_timesteps, get_timestep_embedding
from backend.nn.entry import Model, run_model
from backend.nn.linear import Embedding, Linear
from backend.nn.norm import GroupNorm, LayerNorm, RMSNorm, SpatialNorm, group_norm, layer_norm
from backend.nn.sampling import (Downsample2D, Upsample2D, avg_pool_2x, interpolate_nearest,
                                 torch_nearest_indices, upsample_nearest_2x)
