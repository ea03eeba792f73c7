"""MoVQ: the VQ autoencoder that Kandinsky 2.1, 2.2 and 3 decode latents with.

Port of diffusers 0.35.2 `VQModel` (models/autoencoders/vq_model.py) with the pieces it is
built from: `Encoder`, `Decoder`, `VectorQuantizer` (autoencoders/vae.py),
`DownEncoderBlock2D`, `AttnDownEncoderBlock2D`, `UpDecoderBlock2D`, `AttnUpDecoderBlock2D`,
`UNetMidBlock2D` (unets/unet_2d_blocks.py), `ResnetBlock2D` / `ResnetBlockCondNorm2D`
(resnet.py), `Downsample2D` / `Upsample2D`, `Attention` with `AttnProcessor2_0` and
`SpatialNorm` (attention_processor.py). MoVQ itself: Zheng et al. 2022,
https://huggingface.co/papers/2209.09002.

Attribute paths equal the diffusers checkpoint keys (`decoder.up_blocks.0.attentions.1.to_q.weight`).
The layers (convs, group and spatial norms, linears, the attention kernel, up/down samplers) are
backend/nn's; this file is the architecture. tools/bench_movq.py times a 512x512 decode against
diffusers.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from mindspore import nn

from backend import interrupt
from backend.nn import (Conv2d, Downsample2D, Embedding, GroupNorm, Linear, Model, SpatialNorm, Upsample2D, add_,
                        concat, host_param, is_host, matmul, run_model, scaled_dot_product_attention)

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
UP_BLOCK_TYPES = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")

# Every norm that Encoder/Decoder build gets resnet_eps=1e-6.
NORM_EPS = 1e-6
# Largest (codebook distance) block materialized at once by the quantizer.
MAX_DISTANCE_ELEMENTS = 1 << 24


@dataclass
class VQModelConfig:
    in_channels: int = 3  # image channels into the encoder
    out_channels: int = 3  # image channels out of the decoder
    down_block_types: tuple = ("DownEncoderBlock2D",)  # encoder blocks, highest resolution first
    up_block_types: tuple = ("UpDecoderBlock2D",)  # decoder blocks, lowest resolution first
    block_out_channels: tuple = (64,)  # channels per resolution level, highest resolution first
    layers_per_block: int = 1  # resnets per encoder block (decoder blocks get one more)
    act_fn: str = "silu"  # only silu/swish is used by the published models
    latent_channels: int = 3  # channels of the encoder output / decoder input
    sample_size: int = 32  # training resolution; unused at inference
    num_vq_embeddings: int = 256  # codebook size
    norm_num_groups: int = 32  # groups of the encoder's and resnet group norms
    vq_embed_dim: int | None = None  # codebook vector size; None means latent_channels
    scaling_factor: float = 0.18215  # latent scale used by some pipelines; unused here
    norm_type: str = "group"  # "spatial" (MoVQ: decoder norms conditioned on the latent) or "group"
    mid_block_add_attention: bool = True  # attention between the two mid-block resnets
    lookup_from_codebook: bool = False  # decode(force_not_quantize=True) treats input as indices
    force_upcast: bool = False  # fp16 upcast hint for pipelines; unused here

    @classmethod
    def from_dict(cls, config: dict) -> "VQModelConfig":
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def validate(self) -> None:
        levels = len(self.block_out_channels)
        if levels == 0:
            raise ValueError("block_out_channels must name at least one level")
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError(f"down_block_types ({len(self.down_block_types)}), up_block_types "
                             f"({len(self.up_block_types)}) and block_out_channels ({levels}) "
                             "must have the same length")
        for name in self.down_block_types:
            if name not in DOWN_BLOCK_TYPES:
                raise ValueError(f"down_block_types: {name!r} is not supported; use {DOWN_BLOCK_TYPES}")
        for name in self.up_block_types:
            if name not in UP_BLOCK_TYPES:
                raise ValueError(f"up_block_types: {name!r} is not supported; use {UP_BLOCK_TYPES}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn must be 'silu' (or 'swish'); got {self.act_fn!r}")
        if self.norm_type not in ("group", "spatial"):
            raise ValueError(f"norm_type must be 'group' or 'spatial'; got {self.norm_type!r}")
        if self.lookup_from_codebook:
            raise ValueError("lookup_from_codebook=True is not supported")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1; got {self.layers_per_block}")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"block_out_channels {tuple(self.block_out_channels)} must be "
                                 f"multiples of norm_num_groups={self.norm_num_groups}")
            if self.norm_type == "spatial" and channels % SpatialNorm.GROUPS:
                raise ValueError(f"norm_type='spatial' needs block_out_channels that are multiples "
                                 f"of {SpatialNorm.GROUPS}; got {tuple(self.block_out_channels)}")


class Attention(nn.Cell):
    """diffusers `Attention` as the VAE blocks build it: one head of width `channels`, q/k/v/out
    projections with bias, a group norm or spatial norm first, residual connection.

    Computed channels-first: (B, C, N) tensors and weight @ x projections, so no transposes.
    """

    def __init__(self, channels: int, norm_num_groups: int | None = None,
                 spatial_norm_dim: int | None = None, eps: float = NORM_EPS,
                 rescale_output_factor: float = 1.0):
        super().__init__()
        self.channels = channels
        self.scale = channels ** -0.5  # single head: head dim = channels
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = GroupNorm(norm_num_groups, channels, eps) if norm_num_groups else None
        self.spatial_norm = SpatialNorm(channels, spatial_norm_dim) if spatial_norm_dim else None
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.CellList([Linear(channels, channels)])  # to_out.1 is torch's Dropout

    def construct(self, hidden_states, zq=None):
        residual = hidden_states  # (B, C, H, W)
        if self.spatial_norm is not None:
            hidden_states = self.spatial_norm(hidden_states, zq)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states)
        b, c, h, w = hidden_states.shape
        x = hidden_states.reshape(b, c, h * w)
        # the 1/sqrt(C) of the scores applied to the (smaller) query
        q = self.to_q.channels_first(x) * self.scale  # (B, C, N)
        k = self.to_k.channels_first(x)
        v = self.to_v.channels_first(x)
        attended = scaled_dot_product_attention(q, k, v, scale=1.0, channels_first=True)  # (B, C, N)
        out = add_(self.to_out[0].channels_first(attended).reshape(b, c, h, w), residual)
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


class ResnetBlock2D(nn.Cell):
    """diffusers `ResnetBlock2D` with no time embedding (temb None), or `ResnetBlockCondNorm2D`
    with spatial norms when `zq_channels` is given.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float = NORM_EPS,
                 zq_channels: int | None = None, output_scale_factor: float = 1.0):
        super().__init__()
        self.spatial = zq_channels is not None
        if self.spatial:
            self.norm1 = SpatialNorm(in_channels, zq_channels)
            self.norm2 = SpatialNorm(out_channels, zq_channels)
        else:
            self.norm1 = GroupNorm(groups, in_channels, eps)
            self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def _norm_silu(self, norm, x, zq):
        return norm(x, zq, act=True) if self.spatial else norm(x, act=True)

    def construct(self, x, zq=None):
        h = self.conv1(self._norm_silu(self.norm1, x, zq))
        h = self.conv2(self._norm_silu(self.norm2, h, zq))  # dropout 0 at inference
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = add_(h, x)
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


# --------------------------------------------------------------------------------------------
# Blocks


class DownEncoderBlock2D(nn.Cell):
    """Resnets (each followed by an attention in AttnDownEncoderBlock2D), then a downsampler."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_downsample: bool, add_attention: bool = False):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_layers)])
        self.attentions = nn.CellList([
            Attention(out_channels, norm_num_groups=groups) for _ in range(num_layers)
        ]) if add_attention else None
        self.downsamplers = nn.CellList([Downsample2D(out_channels)]) if add_downsample else None

    def construct(self, x):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Cell):
    """Resnets (each followed by an attention in AttnUpDecoderBlock2D), then an upsampler."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_upsample: bool, zq_channels: int | None, add_attention: bool = False):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups,
                          zq_channels=zq_channels)
            for i in range(num_layers)])
        # With spatial norm the attention is normed by a SpatialNorm, else by a group norm.
        self.attentions = nn.CellList([
            Attention(out_channels, norm_num_groups=None if zq_channels else groups,
                      spatial_norm_dim=zq_channels)
            for _ in range(num_layers)]) if add_attention else None
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if add_upsample else None

    def construct(self, x, zq=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, zq)
            if self.attentions is not None:
                x = self.attentions[i](x, zq)
            interrupt.check()  # the full-resolution blocks take seconds: a Stop need not wait
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Cell):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, zq_channels: int | None, add_attention: bool):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(channels, channels, groups, zq_channels=zq_channels) for _ in range(2)])
        self.add_attention = add_attention
        # torch keeps [None] when attention is off: no parameters either way.
        self.attentions = nn.CellList([
            Attention(channels, norm_num_groups=None if zq_channels else groups,
                      spatial_norm_dim=zq_channels)
        ] if add_attention else [])

    def construct(self, x, zq=None):
        x = self.resnets[0](x, zq)
        if self.add_attention:
            x = self.attentions[0](x, zq)
        return self.resnets[1](x, zq)


class Encoder(nn.Cell):
    def __init__(self, config: VQModelConfig):
        super().__init__()
        channels = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        blocks = []
        for i, block_type in enumerate(config.down_block_types):
            blocks.append(DownEncoderBlock2D(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                add_downsample=i < len(channels) - 1,
                add_attention=block_type == "AttnDownEncoderBlock2D"))
        self.down_blocks = nn.CellList(blocks)
        self.mid_block = UNetMidBlock2D(channels[-1], groups, None, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, channels[-1], NORM_EPS)
        self.conv_out = Conv2d(channels[-1], config.latent_channels, 3, padding=1)  # double_z=False

    def construct(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, act=True))


class Decoder(nn.Cell):
    def __init__(self, config: VQModelConfig):
        super().__init__()
        channels = list(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        # The quantized latent conditions every norm (MoVQ); its channels are latent_channels.
        zq_channels = config.latent_channels if config.norm_type == "spatial" else None
        self.conv_in = Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(channels[0], groups, zq_channels, config.mid_block_add_attention)
        blocks = []
        for i, block_type in enumerate(config.up_block_types):
            blocks.append(UpDecoderBlock2D(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups,
                add_upsample=i < len(channels) - 1, zq_channels=zq_channels,
                add_attention=block_type == "AttnUpDecoderBlock2D"))
        self.up_blocks = nn.CellList(blocks)
        if zq_channels:
            self.conv_norm_out = SpatialNorm(channels[-1], zq_channels)
        else:
            self.conv_norm_out = GroupNorm(groups, channels[-1], NORM_EPS)
        self.spatial = zq_channels is not None
        self.conv_out = Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def construct(self, x, zq=None):
        x = self.conv_in(x)
        x = self.mid_block(x, zq)
        for block in self.up_blocks:
            x = block(x, zq)
        if self.spatial:
            x = self.conv_norm_out(x, zq, act=True)
        else:
            x = self.conv_norm_out(x, act=True)
        return self.conv_out(x)


class VectorQuantizer(nn.Cell):
    """Nearest codebook vector per latent pixel (diffusers `VectorQuantizer`, legacy=True, no remap).

    Inference only: the commitment loss is not computed.
    """

    def __init__(self, num_embeddings: int, embed_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embed_dim = embed_dim
        self.embedding = Embedding(num_embeddings, embed_dim)

    def construct(self, z):
        """z (B, D, H, W) -> (quantized (B, D, H, W), codebook indices (B*H*W,) int32)."""
        b, d, h, w = z.shape
        flat = z.transpose(0, 2, 3, 1).reshape(-1, d)  # (N, D), pixels in (B, H, W) order
        codebook = host_param(self.embedding.weight) if is_host(z) else self.embedding.weight  # (K, D)
        code_sq = (codebook * codebook).sum(-1).reshape(1, -1)  # (1, K)
        rows = max(1, MAX_DISTANCE_ELEMENTS // self.num_embeddings)
        indices = []
        for start in range(0, flat.shape[0], rows):
            block = flat[start:start + rows]
            # torch.cdist's matmul form |z|^2 - 2 z.e + |e|^2; sqrt does not change the argmin.
            dist = (block * block).sum(-1, keepdims=True) - 2 * matmul(block, codebook.T) + code_sq
            indices.append(dist.argmin(axis=1).astype(np.int32))
        index = concat(indices, axis=0)
        quantized = codebook[index]
        quantized = flat + (quantized - flat)  # diffusers' straight-through form, same rounding
        return quantized.reshape(b, h, w, d).transpose(0, 3, 1, 2), index


# --------------------------------------------------------------------------------------------
# Model


class VQModel(Model):
    """MoVQ autoencoder: `encode(images)["latents"]`, `decode(latents)["sample"]` (numpy arrays on
    the host path, Tensors on the device path: backend/nn/entry.py)."""

    def __init__(self, config: VQModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        embed_dim = config.vq_embed_dim or config.latent_channels
        self.encoder = Encoder(config)
        self.quant_conv = Conv2d(config.latent_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(config.num_vq_embeddings, embed_dim)
        self.post_quant_conv = Conv2d(embed_dim, config.latent_channels, 1)
        self.decoder = Decoder(config)

    @classmethod
    def from_config(cls, config: dict) -> "VQModel":
        return cls(VQModelConfig.from_dict(config))

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along each axis."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    # Samples are not split over the cores: the convolutions already spread each sample's bands,
    # and two full-resolution decoder activations at once would double the peak memory.

    def encode(self, x) -> dict:
        """x (B, in_channels, H, W) in [-1, 1] -> {"latents": (B, vq_embed_dim, H/f, W/f)}.

        The latents are the quant_conv output before quantization, as diffusers returns them.
        """
        self._check_input("x", x, self.config.in_channels)
        latents = run_model(self, lambda x: self.quant_conv(self.encoder(x)), x, split_samples=False)
        return {"latents": latents}

    def decode(self, latents, force_not_quantize: bool = False) -> dict:
        """latents (B, vq_embed_dim, h, w) -> {"sample": (B, out_channels, h*f, w*f)}.

        `force_not_quantize=False` (diffusers' default) first snaps each latent pixel to its
        nearest codebook vector; the Kandinsky pipelines pass True.
        """
        self._check_input("latents", latents, self.config.vq_embed_dim or self.config.latent_channels)

        def forward(quant):
            if not force_not_quantize:
                quant = self.quantize(quant)[0]
            zq = quant if self.config.norm_type == "spatial" else None
            return self.decoder(self.post_quant_conv(quant), zq)

        return {"sample": run_model(self, forward, latents, split_samples=False)}

    def construct(self, x):
        return self.decode(self.encode(x)["latents"])["sample"]

    @staticmethod
    def _check_input(name: str, x, channels: int) -> None:
        if len(x.shape) != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must have shape (B, {channels}, H, W); got {tuple(x.shape)}")
