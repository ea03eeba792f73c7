"""The layer library: every layer once, its host (numpy) and device (mindspore.ops) paths side by
side (backend/nn/entry.py explains the two paths; backend/nn/host.py holds the host kernels).
Models import layers from here, by these package-level names."""
from backend.nn.conv import conv2d
from backend.nn.entry import Model, run_model
from backend.nn.layers import (
    Conv2d,
    Embedding,
    GroupNorm,
    LayerNorm,
    Linear,
    RMSNorm,
    gelu,
    get_timestep_embedding,
    group_norm,
    host_param,
    is_host,
    layer_norm,
    mish,
    quick_gelu,
    relu,
    scaled_dot_product_attention,
    silu,
)
