from backend.nn.conv import conv2d
from backend.nn.layers import (
    Conv2d,
    Embedding,
    GroupNorm,
    LayerNorm,
    Linear,
    gelu,
    group_norm,
    layer_norm,
    scaled_dot_product_attention,
    silu,
)
