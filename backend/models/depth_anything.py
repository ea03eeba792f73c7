"""Depth Anything (V1 and V2): a DINOv2 ViT backbone and a DPT head that predicts relative depth.

Port of transformers 4.57.1 `DepthAnythingForDepthEstimation` (models/depth_anything/
modeling_depth_anything.py) with its `Dinov2Backbone` (models/dinov2/modeling_dinov2.py), inference
only. Papers: Yang et al. 2024, https://huggingface.co/papers/2401.10891 and 2406.09414 (V2); DINOv2,
Oquab et al. 2023; DPT, Ranftl et al. 2021. Depth-Anything-V2-Small-hf: ViT-S/14 (384 wide, 12 layers,
6 heads), features of layers 3, 6, 9 and 12, 24.8M parameters.

Attribute paths equal the checkpoint keys (`backbone.encoder.layer.0.attention.attention.query.weight`,
`neck.reassemble_stage.layers.0.resize.weight`, `neck.fusion_stage.layers.3.residual_layer1.convolution1
.weight`, `head.conv3.bias`, ...), so `backend.weights.load_model(DepthAnythingForDepthEstimation,
folder)` is the identity map. The config is the repo's config.json with the backbone's nested as
`backbone_config`, as transformers nests it.

Shapes: pixel_values (B, 3, H, W) with H, W multiples of the patch size (14) as DPTImageProcessor
makes them; p = (H/14, W/14) patches; tokens (B, 1 + ph*pw, C) (the class token first);
predicted_depth (B, H, W), larger = nearer (the relative models predict disparity).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from mindspore import nn

from backend import interrupt
from backend.nn import (ACTIVATIONS, Conv2d, ConvTranspose2d, Identity, LayerNorm, Linear, Model, add_, concat,
                        as_dtype, get_activation, host_param, interpolate_bicubic, interpolate_bilinear, is_host,
                        relu, run_model, scaled_dot_product_attention, zeros_parameter)


def _known_fields(cls, config: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in config.items() if k in names}


@dataclass
class Dinov2Config:
    """Fields of transformers' `Dinov2Config` (defaults are transformers': a published config stores
    only what differs from them)."""

    hidden_size: int = 768  # width of the transformer
    num_hidden_layers: int = 12  # encoder layers
    num_attention_heads: int = 12  # heads per attention
    mlp_ratio: float = 4  # MLP hidden width = int(hidden_size * mlp_ratio)
    hidden_act: str = "gelu"  # the MLP's activation (exact erf gelu)
    layer_norm_eps: float = 1e-6  # epsilon of every LayerNorm
    image_size: int = 224  # training resolution: the position table has (image_size / patch_size)^2 rows
    patch_size: int = 14  # side of one patch (conv kernel = stride)
    num_channels: int = 3  # input image channels
    qkv_bias: bool = True  # biases of the query/key/value projections
    layerscale_value: float = 1.0  # initial layer scale; the checkpoint holds the trained values
    use_swiglu_ffn: bool = False  # SwiGLU MLP (DINOv2 giant); not ported
    use_mask_token: bool = True  # the (unused at inference) mask token is a parameter
    out_indices: list | None = None  # hidden states returned: 0 = embeddings, i = after layer i
    out_features: list | None = None  # the same as stage names ("stage3"); used when out_indices is not given
    apply_layernorm: bool = True  # the final LayerNorm applied to each returned hidden state
    reshape_hidden_states: bool = True  # (B, C, h, w) maps instead of tokens; Depth Anything needs False

    @classmethod
    def from_dict(cls, config: dict) -> "Dinov2Config":
        result = cls(**_known_fields(cls, config))
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
                     "num_channels"):
            value = getattr(result, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"backbone_config: {name} must be a positive integer; got {value!r}")
        if result.hidden_size % result.num_attention_heads:
            raise ValueError(f"backbone_config: hidden_size ({result.hidden_size}) must be divisible by "
                             f"num_attention_heads ({result.num_attention_heads})")
        if result.hidden_act not in ACTIVATIONS:
            raise ValueError(f"backbone_config: hidden_act must be one of {sorted(ACTIVATIONS)}; "
                             f"got {result.hidden_act!r}")
        if result.use_swiglu_ffn:
            raise ValueError("backbone_config: use_swiglu_ffn=True (the DINOv2 giant MLP) is not supported")
        result.out_indices = result.stage_indices()
        return result

    def stage_indices(self) -> list[int]:
        """The hidden states the backbone returns, ascending as transformers' BackboneMixin orders them
        (stage_names "stem", "stage1", ...; only the last stage when neither field is given)."""
        if self.out_indices is not None:
            indices = [int(i) + (self.num_hidden_layers + 1 if int(i) < 0 else 0) for i in self.out_indices]
        elif self.out_features is not None:
            names = ["stem"] + [f"stage{i}" for i in range(1, self.num_hidden_layers + 1)]
            unknown = [name for name in self.out_features if name not in names]
            if unknown:
                raise ValueError(f"backbone_config: out_features {unknown} are not stages of this backbone")
            indices = [names.index(name) for name in self.out_features]
        else:
            indices = [self.num_hidden_layers]
        if any(not 0 <= i <= self.num_hidden_layers for i in indices) or len(set(indices)) != len(indices):
            raise ValueError(f"backbone_config: out_indices must be distinct stages in [0, "
                             f"{self.num_hidden_layers}]; got {indices}")
        return sorted(indices)

    @property
    def intermediate_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def _default_backbone() -> dict:
    # transformers' DepthAnythingConfig when neither backbone_config nor backbone is given
    return {"image_size": 518, "hidden_size": 384, "num_attention_heads": 6, "out_indices": [9, 10, 11, 12],
            "apply_layernorm": True, "reshape_hidden_states": False}


@dataclass
class DepthAnythingConfig:
    """Fields of transformers' `DepthAnythingConfig` config.json (defaults are transformers')."""

    backbone_config: Dinov2Config = field(default_factory=lambda: Dinov2Config.from_dict(_default_backbone()))
    patch_size: int = 14  # patch grid of the input: (H // patch_size, W // patch_size)
    reassemble_hidden_size: int = 384  # channels of the backbone's tokens into the neck
    reassemble_factors: list = field(default_factory=lambda: [4, 2, 1, 0.5])  # resize of each feature map
    neck_hidden_sizes: list = field(default_factory=lambda: [48, 96, 192, 384])  # channels of each feature map
    fusion_hidden_size: int = 64  # channels of the fusion stage
    head_in_index: int = -1  # fused map the head reads
    head_hidden_size: int = 32  # channels of the head's second conv
    depth_estimation_type: str = "relative"  # "relative" (ReLU head); "metric" is not ported
    max_depth: float | None = None  # scale of the output (transformers: 1 when not set)

    @classmethod
    def from_dict(cls, config: dict) -> "DepthAnythingConfig":
        if config.get("backbone") or config.get("use_timm_backbone"):
            raise ValueError("config: a backbone named by `backbone` (or a timm backbone) is not supported; the "
                             "config must nest the DINOv2 config as `backbone_config`")
        kwargs = _known_fields(cls, config)
        backbone = config.get("backbone_config")
        if backbone is None:
            backbone = _default_backbone()
        if not isinstance(backbone, dict) or backbone.get("model_type", "dinov2") != "dinov2":
            raise ValueError(f"config: backbone_config must be a DINOv2 config (model_type 'dinov2'); got "
                             f"{backbone.get('model_type') if isinstance(backbone, dict) else backbone!r}")
        kwargs["backbone_config"] = Dinov2Config.from_dict(backbone)
        result = cls(**kwargs)
        result.validate()
        return result

    def validate(self) -> None:
        backbone = self.backbone_config
        levels = len(self.neck_hidden_sizes)
        if len(self.reassemble_factors) != levels or len(backbone.out_indices) != levels:
            raise ValueError(f"config: neck_hidden_sizes ({levels}), reassemble_factors "
                             f"({len(self.reassemble_factors)}) and the backbone's out_indices "
                             f"({len(backbone.out_indices)}) must have the same length")
        for factor in self.reassemble_factors:
            if not (factor == 1 or (factor > 1 and float(factor).is_integer())
                    or (0 < factor < 1 and float(1 / factor).is_integer())):
                raise ValueError(f"config: reassemble_factors must be integers >= 1 or 1/n; got {factor!r}")
        if backbone.reshape_hidden_states:
            raise ValueError("config: backbone_config.reshape_hidden_states must be false (the neck reads the "
                             "backbone's tokens)")
        if self.reassemble_hidden_size != backbone.hidden_size:
            raise ValueError(f"config: reassemble_hidden_size ({self.reassemble_hidden_size}) must equal the "
                             f"backbone's hidden_size ({backbone.hidden_size})")
        if self.depth_estimation_type != "relative":
            raise ValueError(f"config: depth_estimation_type {self.depth_estimation_type!r} is not supported; "
                             "only 'relative' (the head ending in ReLU) is ported")
        if not -levels <= self.head_in_index < levels:
            raise ValueError(f"config: head_in_index must index one of the {levels} fused maps; "
                             f"got {self.head_in_index}")

    @property
    def depth_scale(self) -> float:
        return float(self.max_depth) if self.max_depth else 1.0


# --------------------------------------------------------------------------------- DINOv2 backbone


class Dinov2PatchEmbeddings(nn.Cell):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.projection = Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                 stride=config.patch_size)

    def construct(self, pixel_values):
        x = self.projection(pixel_values)  # (B, C, ph, pw)
        b, c = x.shape[0], x.shape[1]
        return x.reshape(b, c, -1).swapaxes(1, 2)  # (B, ph*pw, C)


class Dinov2Embeddings(nn.Cell):
    """Class token, patch embeddings and the position table, resized (bicubic) to the patch grid."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.patch_size = config.patch_size
        self.cls_token = zeros_parameter((1, 1, config.hidden_size))
        if config.use_mask_token:
            self.mask_token = zeros_parameter((1, config.hidden_size))  # masked pre-training only
        self.patch_embeddings = Dinov2PatchEmbeddings(config)
        num_patches = (config.image_size // config.patch_size) ** 2
        self.position_embeddings = zeros_parameter((1, num_patches + 1, config.hidden_size))

    @staticmethod
    def interpolate_pos_encoding(table, num_patches: int, height: int, width: int, patch_size: int):
        """The (1, 1 + ph*pw, C) position table for an input of height x width pixels (transformers'
        `interpolate_pos_encoding`: the trained g x g grid resized bicubically, align_corners=False;
        as it is when the grid and the input are the same square)."""
        num_positions = table.shape[1] - 1
        if num_patches == num_positions and height == width:
            return table
        dim = table.shape[-1]
        side = int(num_positions ** 0.5)
        grid = table[:, 1:].reshape(1, side, side, dim).transpose(0, 3, 1, 2)  # (1, C, g, g)
        grid = interpolate_bicubic(grid, (height // patch_size, width // patch_size))
        grid = grid.transpose(0, 2, 3, 1).reshape(1, -1, dim)  # (1, ph*pw, C)
        return concat([table[:, :1], grid], axis=1)

    def construct(self, pixel_values):
        b, _, height, width = pixel_values.shape
        patches = self.patch_embeddings(pixel_values)  # (B, N, C)
        cls, table = self.cls_token, self.position_embeddings  # float32 in a bfloat16 model too
        if is_host(pixel_values):
            cls, table = host_param(cls), host_param(table)
        else:
            cls, table = as_dtype(cls, patches.dtype), as_dtype(table, patches.dtype)
        embeddings = concat([concat([cls] * b, axis=0), patches], axis=1)  # (B, 1 + N, C)
        return add_(embeddings, self.interpolate_pos_encoding(table, patches.shape[1], height, width,
                                                              self.patch_size))


class Dinov2SelfAttention(nn.Cell):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)

    def construct(self, x):
        b, n, c = x.shape  # (B, N, C)
        q, k, v = (proj(x).reshape(b, n, self.num_heads, self.head_dim).swapaxes(1, 2)
                   for proj in (self.query, self.key, self.value))  # (B, h, N, d)
        out = scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)  # (B, h, N, d)
        return out.swapaxes(1, 2).reshape(b, n, c)


class Dinov2SelfOutput(nn.Cell):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def construct(self, x):
        return self.dense(x)


class Dinov2Attention(nn.Cell):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.attention = Dinov2SelfAttention(config)
        self.output = Dinov2SelfOutput(config)

    def construct(self, x):
        return self.output(self.attention(x))


class Dinov2LayerScale(nn.Cell):
    """x * lambda1, per channel."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.lambda1 = zeros_parameter((config.hidden_size,))

    def construct(self, x):
        if is_host(x):  # x is a layer's fresh output
            x *= host_param(self.lambda1)
            return x
        return x * as_dtype(self.lambda1, x.dtype)


class Dinov2MLP(nn.Cell):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.activation = get_activation(config.hidden_act)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def construct(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class Dinov2Layer(nn.Cell):
    """Pre-norm layer with layer scale: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Dinov2Attention(config)
        self.layer_scale1 = Dinov2LayerScale(config)
        self.norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Dinov2MLP(config)
        self.layer_scale2 = Dinov2LayerScale(config)

    def construct(self, x):
        x = add_(self.layer_scale1(self.attention(self.norm1(x))), x)
        return add_(self.layer_scale2(self.mlp(self.norm2(x))), x)


class Dinov2Encoder(nn.Cell):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.layer = nn.CellList([Dinov2Layer(config) for _ in range(config.num_hidden_layers)])

    def construct(self, x, keep: list[int]) -> list:
        """The hidden states at `keep` (0 = the embeddings, i = after layer i)."""
        kept = [x] if 0 in keep else []
        for i, layer in enumerate(self.layer, start=1):
            interrupt.check()
            x = layer(x)
            if i in keep:
                kept.append(x)
            if i == keep[-1]:
                break  # the layers past the last kept state change nothing the neck reads
        return kept


class Dinov2Backbone(nn.Cell):
    """transformers `Dinov2Backbone`: the hidden states at out_indices, each through the final
    LayerNorm, as tokens (B, 1 + N, C)."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.config = config
        self.embeddings = Dinov2Embeddings(config)
        self.encoder = Dinov2Encoder(config)
        self.layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, pixel_values) -> list:
        states = self.encoder(self.embeddings(pixel_values), self.config.out_indices)
        return [self.layernorm(s) for s in states] if self.config.apply_layernorm else states


# --------------------------------------------------------------------------------------- DPT neck


class DepthAnythingReassembleLayer(nn.Cell):
    """1x1 projection, then resize by `factor`: a transposed conv (up), nothing, or a strided 3x3 conv (down)."""

    def __init__(self, config: DepthAnythingConfig, channels: int, factor: float):
        super().__init__()
        self.projection = Conv2d(config.reassemble_hidden_size, channels, 1)
        if factor > 1:
            self.resize = ConvTranspose2d(channels, channels, int(factor), stride=int(factor))
        elif factor == 1:
            self.resize = Identity()
        else:
            self.resize = Conv2d(channels, channels, 3, stride=int(1 / factor), padding=1)

    def construct(self, x):
        return self.resize(self.projection(x))


class DepthAnythingReassembleStage(nn.Cell):
    """Tokens -> feature maps: the class token dropped (readout "ignore"), the patch tokens laid out on
    the (ph, pw) grid, each map projected and resized."""

    def __init__(self, config: DepthAnythingConfig):
        super().__init__()
        self.layers = nn.CellList([DepthAnythingReassembleLayer(config, channels, factor)
                                   for channels, factor in zip(config.neck_hidden_sizes, config.reassemble_factors)])

    def construct(self, hidden_states: list, patch_height: int, patch_width: int) -> list:
        out = []
        for layer, tokens in zip(self.layers, hidden_states):
            b, _, c = tokens.shape
            grid = tokens[:, 1:].reshape(b, patch_height, patch_width, c).transpose(0, 3, 1, 2)  # (B, C, ph, pw)
            out.append(layer(grid))
        return out


class DepthAnythingPreActResidualLayer(nn.Cell):
    """Pre-activation residual unit: x + conv2(relu(conv1(relu(x))))."""

    def __init__(self, config: DepthAnythingConfig):
        super().__init__()
        channels = config.fusion_hidden_size
        self.convolution1 = Conv2d(channels, channels, 3, padding=1)
        self.convolution2 = Conv2d(channels, channels, 3, padding=1)

    def construct(self, x):
        return add_(self.convolution2(relu(self.convolution1(relu(x)))), x)


class DepthAnythingFeatureFusionLayer(nn.Cell):
    """(fused so far + unit1(feature)) -> unit2 -> bilinear resize (align_corners=True) -> 1x1 projection."""

    def __init__(self, config: DepthAnythingConfig):
        super().__init__()
        self.projection = Conv2d(config.fusion_hidden_size, config.fusion_hidden_size, 1)
        self.residual_layer1 = DepthAnythingPreActResidualLayer(config)
        self.residual_layer2 = DepthAnythingPreActResidualLayer(config)

    def construct(self, hidden_state, residual=None, size=None):
        if residual is not None:
            if tuple(hidden_state.shape) != tuple(residual.shape):
                residual = interpolate_bilinear(residual, hidden_state.shape[2:], align_corners=False)
            hidden_state = add_(self.residual_layer1(residual), hidden_state)
        hidden_state = self.residual_layer2(hidden_state)
        if size is None:  # the last layer: scale_factor=2
            size = (2 * hidden_state.shape[2], 2 * hidden_state.shape[3])
        return self.projection(interpolate_bilinear(hidden_state, size, align_corners=True))


class DepthAnythingFeatureFusionStage(nn.Cell):
    """Fuses the maps from the coarsest up; each result is resized to the next map's size (the last
    one doubled)."""

    def __init__(self, config: DepthAnythingConfig):
        super().__init__()
        self.layers = nn.CellList([DepthAnythingFeatureFusionLayer(config) for _ in config.neck_hidden_sizes])

    def construct(self, features: list) -> list:
        features = features[::-1]
        fused, out = None, []
        for i, (feature, layer) in enumerate(zip(features, self.layers)):
            size = tuple(features[i + 1].shape[2:]) if i + 1 < len(features) else None
            fused = layer(feature, size=size) if fused is None else layer(fused, feature, size=size)
            out.append(fused)
        return out


class DepthAnythingNeck(nn.Cell):
    def __init__(self, config: DepthAnythingConfig):
        super().__init__()
        self.reassemble_stage = DepthAnythingReassembleStage(config)
        self.convs = nn.CellList([Conv2d(channels, config.fusion_hidden_size, 3, padding=1, bias=False)
                                  for channels in config.neck_hidden_sizes])
        self.fusion_stage = DepthAnythingFeatureFusionStage(config)

    def construct(self, hidden_states: list, patch_height: int, patch_width: int) -> list:
        maps = self.reassemble_stage(hidden_states, patch_height, patch_width)
        return self.fusion_stage([conv(m) for conv, m in zip(self.convs, maps)])


class DepthAnythingDepthEstimationHead(nn.Cell):
    """conv1 -> bilinear resize to the input's size (align_corners=True) -> conv2 -> ReLU -> conv3 (1x1)
    -> ReLU (relative depth) -> * max_depth -> (B, H, W)."""

    def __init__(self, config: DepthAnythingConfig):
        super().__init__()
        self.head_in_index = config.head_in_index
        self.patch_size = config.patch_size
        self.depth_scale = config.depth_scale
        features = config.fusion_hidden_size
        self.conv1 = Conv2d(features, features // 2, 3, padding=1)
        self.conv2 = Conv2d(features // 2, config.head_hidden_size, 3, padding=1)
        self.conv3 = Conv2d(config.head_hidden_size, 1, 1)

    def construct(self, hidden_states: list, patch_height: int, patch_width: int):
        x = self.conv1(hidden_states[self.head_in_index])
        x = interpolate_bilinear(x, (patch_height * self.patch_size, patch_width * self.patch_size),
                                 align_corners=True)
        depth = relu(self.conv3(relu(self.conv2(x))))  # (B, 1, H, W)
        if self.depth_scale != 1.0:
            depth = depth * self.depth_scale
        return depth[:, 0]


# -------------------------------------------------------------------------------------------- model


class DepthAnythingForDepthEstimation(Model):
    """transformers `DepthAnythingForDepthEstimation`: pixel_values (B, 3, H, W) -> predicted_depth
    (B, H', W') with H' = H // 14 * 14 (numpy on the host path, a Tensor on the device path:
    backend/nn/entry.py)."""

    def __init__(self, config: DepthAnythingConfig):
        super().__init__()
        self.config = config
        self.backbone = Dinov2Backbone(config.backbone_config)
        self.neck = DepthAnythingNeck(config)
        self.head = DepthAnythingDepthEstimationHead(config)

    @classmethod
    def from_config(cls, config: dict) -> "DepthAnythingForDepthEstimation":
        return cls(DepthAnythingConfig.from_dict(config))

    def construct(self, pixel_values):
        shape = tuple(pixel_values.shape)
        channels, patch = self.config.backbone_config.num_channels, self.config.backbone_config.patch_size
        if len(shape) != 4 or shape[1] != channels:
            raise ValueError(f"pixel_values must have shape (batch, {channels}, height, width); got {shape}")
        if shape[2] < patch or shape[3] < patch:
            raise ValueError(f"pixel_values is {shape[3]}x{shape[2]}; the model needs at least one "
                             f"{patch}x{patch} patch")
        return run_model(self, self._forward, pixel_values)

    def _forward(self, pixel_values):
        _, _, height, width = pixel_values.shape
        patch_height, patch_width = height // self.config.patch_size, width // self.config.patch_size
        hidden_states = self.neck(self.backbone(pixel_values), patch_height, patch_width)
        return self.head(hidden_states, patch_height, patch_width)

