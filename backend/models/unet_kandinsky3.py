"""Kandinsky3UNet, the Kandinsky 3 noise predictor (3.0B parameters in the published config).

Ported operation for operation from diffusers 0.35.2 `models/unets/unet_kandinsky3.py`
(Kandinsky3UNet and its blocks), with `models/attention_processor.py` Attention +
AttnProcessor2_0 as these blocks configure it (no biases in q/k/v/out, scale 1/sqrt(head_dim),
additive mask over the text tokens). Attribute paths equal the diffusers checkpoint keys
(`down_blocks.1.attentions.2.attention.to_q.weight`, `up_blocks.0.resnets_in.0.resnet_blocks.1.
up_sample.weight`, `add_time_condition.attention.to_out.0.weight`, ...). diffusers' `nn.Identity`
entries of its ModuleLists are kept as parameter-free cells so the indices stay the same.

Two execution paths as in unet_2d_condition.py ("Two execution paths"): on CPU numpy arrays
from input to output, on GPU/Ascend (or `cpu_numpy_path = False`) mindspore.ops Tensors. The
layers (Linear, Conv2d, LayerNorm, GroupNorm with fused scale/shift + SiLU, timestep
embedding) are the 2.x UNet's, which take either kind.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from backend import interrupt
from backend.device import on_cpu
from backend.nn import layers
from backend.nn.host import host_matmul, split_batch
from backend.models.unet_2d_condition import (Conv2d, GroupNorm, LayerNorm, Linear, SiLU, TimestepEmbedding,
                                              Timesteps, concat, silu)

# Hard-coded in diffusers' Kandinsky3UNet (its "TODO: put into config").
EXPANSION_RATIO = 4  # feed-forward width / channels in the attention blocks
COMPRESSION_RATIO = 2  # resnet hidden width = max(in, out) / this
ADD_CROSS_ATTENTION = (False, True, True, True)  # per level
ADD_SELF_ATTENTION = (False, True, True, True)  # per level


@dataclass
class Kandinsky3UNetConfig:
    """Fields of diffusers' Kandinsky3UNet config.json (defaults are diffusers', = the published config)."""

    in_channels: int = 4  # latent channels in and out
    time_embedding_dim: int = 1536  # width of the time embedding every norm is conditioned on
    groups: int = 32  # groups of every GroupNorm
    attention_head_dim: int = 64  # width of one attention head (heads = channels / this)
    layers_per_block: int = 3  # resnet(+attention) pairs per level
    block_out_channels: tuple = (384, 768, 1536, 3072)  # channels per level (4 levels)
    cross_attention_dim: int = 4096  # width of the projected text tokens
    encoder_hid_dim: int = 4096  # width of the text encoder's states (T5: d_model)


def _host(x) -> bool:
    return isinstance(x, np.ndarray)


def _np(param) -> np.ndarray:
    array = param.asnumpy()
    return array if array.dtype == np.float32 else array.astype(np.float32)


class Identity(nn.Cell):
    """diffusers' nn.Identity placeholders (no parameters; keeps ModuleList indices)."""

    def construct(self, x, *args, **kwargs):
        return x


class ConvTranspose2x2(nn.Cell):
    """torch.nn.ConvTranspose2d(C, O, kernel_size=2, stride=2): weight (C, O, 2, 2), bias (O,).

    Each input pixel writes its own 2x2 output patch, so it is one product
    (O*4, C) @ (C, H*W) per sample, then the patches are interleaved into (O, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = layers.zeros_parameter((in_channels, out_channels, 2, 2))
        self.bias = layers.zeros_parameter((out_channels,))

    def construct(self, x):
        b, c, h, w = x.shape
        o = self.out_channels
        if _host(x):
            weight = _np(self.weight).reshape(c, o * 4).T  # (O*4, C), rows ordered (o, p, q)
            y = host_matmul(weight, x.reshape(b, c, h * w))  # (B, O*4, H*W)
            y = y.reshape(b, o, 2, 2, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, o, 2 * h, 2 * w)
            y += _np(self.bias)[None, :, None, None]
            return y
        weight = self.weight.reshape(c, o * 4).T
        y = ops.matmul(weight, x.reshape(b, c, h * w))
        y = y.reshape(b, o, 2, 2, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, o, 2 * h, 2 * w)
        return y + self.bias.reshape(1, -1, 1, 1)


class Attention(nn.Cell):
    """diffusers Attention(query_dim, cross_attention_dim, dim_head, out_dim, out_bias=False) with
    AttnProcessor2_0: heads = out_dim / dim_head, no biases, scale 1/sqrt(dim_head)."""

    def __init__(self, query_dim: int, cross_attention_dim: int, dim_head: int, out_dim: int):
        super().__init__()
        self.heads = out_dim // dim_head
        self.dim_head = dim_head
        self.inner_dim = out_dim
        self.to_q = Linear(query_dim, out_dim, bias=False)
        self.to_k = Linear(cross_attention_dim, out_dim, bias=False)
        self.to_v = Linear(cross_attention_dim, out_dim, bias=False)
        # torch ModuleList [Linear, Dropout]: only index 0 has parameters.
        self.to_out = nn.CellList([Linear(out_dim, out_dim, bias=False)])

    def construct(self, hidden_states, context, mask=None):
        """hidden_states (B, N, Cq), context (B, L, Ck), mask additive (B, 1, 1, L) -> (B, N, out_dim)."""
        b, n, _ = hidden_states.shape
        m = context.shape[1]
        h, d = self.heads, self.dim_head
        if _host(hidden_states):
            q = self.to_q(hidden_states).reshape(b, n, h, d).transpose(0, 2, 1, 3)  # (B, h, N, d) view
            k = self.to_k(context).reshape(b, m, h, d).transpose(0, 2, 1, 3)
            v = self.to_v(context).reshape(b, m, h, d).transpose(0, 2, 1, 3)
            out = layers.scaled_dot_product_attention(q, k, v, mask)  # (B, h, N, d)
            return self.to_out[0](out.transpose(0, 2, 1, 3).reshape(b, n, self.inner_dim))
        q = self.to_q(hidden_states).reshape(b, n, h, d).swapaxes(1, 2)
        k = self.to_k(context).reshape(b, m, h, d).swapaxes(1, 2)
        v = self.to_v(context).reshape(b, m, h, d).swapaxes(1, 2)
        out = layers.scaled_dot_product_attention(q, k, v, mask)
        return self.to_out[0](out.swapaxes(1, 2).reshape(b, n, self.inner_dim))


class Kandinsky3EncoderProj(nn.Cell):
    def __init__(self, encoder_hid_dim: int, cross_attention_dim: int):
        super().__init__()
        self.projection_linear = Linear(encoder_hid_dim, cross_attention_dim, bias=False)
        self.projection_norm = LayerNorm(cross_attention_dim)

    def construct(self, x):
        return self.projection_norm(self.projection_linear(x))


class Kandinsky3ConditionalGroupNorm(nn.Cell):
    """GroupNorm without affine, then * (1 + scale) + shift from the time embedding
    (context_mlp = Sequential(SiLU, Linear)); an optional SiLU after, fused on the host path."""

    def __init__(self, groups: int, normalized_shape: int, context_dim: int):
        super().__init__()
        self.norm = GroupNorm(groups, normalized_shape, affine=False)
        self.context_mlp = nn.CellList([SiLU(), Linear(context_dim, 2 * normalized_shape)])
        self.channels = normalized_shape

    def construct(self, x, context, act: bool = False):
        context = self.context_mlp[1](silu(context))  # (B, 2C)
        scale, shift = context[:, :self.channels], context[:, self.channels:]
        return self.norm(x, scale, shift, act=act)


class Kandinsky3Block(nn.Cell):
    """norm(t) -> SiLU -> [2x transposed-conv up] -> conv k -> [2x2 stride-2 conv down]."""

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int, kernel_size: int = 3,
                 norm_groups: int = 32, up_resolution=None):
        super().__init__()
        self.group_norm = Kandinsky3ConditionalGroupNorm(norm_groups, in_channels, time_embed_dim)
        self.up_sample = ConvTranspose2x2(in_channels, in_channels) if up_resolution else None
        self.projection = Conv2d(in_channels, out_channels, kernel_size, padding=int(kernel_size > 1))
        down = up_resolution is not None and not up_resolution
        self.down_sample = Conv2d(out_channels, out_channels, 2, stride=2) if down else None

    def construct(self, x, time_embed):
        x = self.group_norm(x, time_embed, act=True)
        if self.up_sample is not None:
            x = self.up_sample(x)
        x = self.projection(x)
        if self.down_sample is not None:
            x = self.down_sample(x)
        return x


class Kandinsky3ResNetBlock(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int, norm_groups: int = 32,
                 compression_ratio: int = 2, up_resolutions=(None,) * 4):
        super().__init__()
        kernel_sizes = [1, 3, 3, 1]
        hidden = max(in_channels, out_channels) // compression_ratio
        channels = [(in_channels, hidden), (hidden, hidden), (hidden, hidden), (hidden, out_channels)]
        self.resnet_blocks = nn.CellList([
            Kandinsky3Block(cin, cout, time_embed_dim, k, norm_groups, up)
            for (cin, cout), k, up in zip(channels, kernel_sizes, up_resolutions)])
        self.shortcut_up_sample = (ConvTranspose2x2(in_channels, in_channels)
                                   if True in up_resolutions else None)
        self.shortcut_projection = (Conv2d(in_channels, out_channels, 1)
                                    if in_channels != out_channels else None)
        self.shortcut_down_sample = (Conv2d(out_channels, out_channels, 2, stride=2)
                                     if False in up_resolutions else None)

    def construct(self, x, time_embed):
        out = x
        for block in self.resnet_blocks:
            out = block(out, time_embed)
        for shortcut in (self.shortcut_up_sample, self.shortcut_projection, self.shortcut_down_sample):
            if shortcut is not None:
                x = shortcut(x)
        if _host(out):
            out += x
            return out
        return x + out


class Kandinsky3AttentionPooling(nn.Cell):
    """Adds attention(mean of the text tokens -> the tokens) to the time embedding."""

    def __init__(self, num_channels: int, context_dim: int, head_dim: int = 64):
        super().__init__()
        self.attention = Attention(context_dim, context_dim, head_dim, num_channels)

    def construct(self, x, context, context_mask=None):
        if _host(context):
            query = context.mean(axis=1, keepdims=True)  # (B, 1, C)
        else:
            query = context.mean(axis=1, keep_dims=True)
        pooled = self.attention(query, context, context_mask)  # (B, 1, T)
        return x + pooled[:, 0]


class Kandinsky3AttentionBlock(nn.Cell):
    """x + attention(norm(x) over pixels -> text tokens, or -> pixels), then x + FF(norm(x))."""

    def __init__(self, num_channels: int, time_embed_dim: int, context_dim=None, norm_groups: int = 32,
                 head_dim: int = 64, expansion_ratio: int = 4):
        super().__init__()
        self.in_norm = Kandinsky3ConditionalGroupNorm(norm_groups, num_channels, time_embed_dim)
        self.attention = Attention(num_channels, context_dim or num_channels, head_dim, num_channels)
        hidden = expansion_ratio * num_channels
        self.out_norm = Kandinsky3ConditionalGroupNorm(norm_groups, num_channels, time_embed_dim)
        self.feed_forward = nn.CellList([Conv2d(num_channels, hidden, 1, bias=False), SiLU(),
                                         Conv2d(hidden, num_channels, 1, bias=False)])

    def construct(self, x, time_embed, context=None, context_mask=None):
        b, c, h, w = x.shape
        out = self.in_norm(x, time_embed).reshape(b, c, h * w)
        out = out.transpose(0, 2, 1) if _host(out) else out.swapaxes(1, 2)  # (B, N, C)
        if context is None:  # self-attention: the normalized pixels, no mask
            context, context_mask = out, None
        out = self.attention(out, context, context_mask)  # (B, N, C)
        out = (out.transpose(0, 2, 1) if _host(out) else out.swapaxes(1, 2)).reshape(b, c, h, w)
        x = x + out
        out = self.feed_forward[2](silu(self.feed_forward[0](self.out_norm(x, time_embed))))
        if _host(out):
            out += x
            return out
        return x + out


class Kandinsky3DownSampleBlock(nn.Cell):
    def __init__(self, in_channels, out_channels, time_embed_dim, context_dim=None, num_blocks=3, groups=32,
                 head_dim=64, expansion_ratio=4, compression_ratio=2, down_sample=True, self_attention=True):
        super().__init__()
        self.self_attention = self_attention
        self.context_dim = context_dim
        attentions = [Kandinsky3AttentionBlock(in_channels, time_embed_dim, None, groups, head_dim, expansion_ratio)
                      if self_attention else Identity()]
        resnets_in, resnets_out = [], []
        up_resolutions = [[None] * 4] * (num_blocks - 1) + [[None, None, False if down_sample else None, None]]
        channels = [(in_channels, out_channels)] + [(out_channels, out_channels)] * (num_blocks - 1)
        for (cin, cout), up in zip(channels, up_resolutions):
            resnets_in.append(Kandinsky3ResNetBlock(cin, cout, time_embed_dim, groups, compression_ratio))
            attentions.append(Kandinsky3AttentionBlock(cout, time_embed_dim, context_dim, groups, head_dim,
                                                       expansion_ratio) if context_dim is not None else Identity())
            resnets_out.append(Kandinsky3ResNetBlock(cout, cout, time_embed_dim, groups, compression_ratio, up))
        self.attentions = nn.CellList(attentions)
        self.resnets_in = nn.CellList(resnets_in)
        self.resnets_out = nn.CellList(resnets_out)

    def construct(self, x, time_embed, context=None, context_mask=None):
        if self.self_attention:
            x = self.attentions[0](x, time_embed)
        for i in range(len(self.resnets_in)):
            x = self.resnets_in[i](x, time_embed)
            if self.context_dim is not None:
                x = self.attentions[i + 1](x, time_embed, context, context_mask)
            x = self.resnets_out[i](x, time_embed)
        return x


class Kandinsky3UpSampleBlock(nn.Cell):
    def __init__(self, in_channels, cat_dim, out_channels, time_embed_dim, context_dim=None, num_blocks=3,
                 groups=32, head_dim=64, expansion_ratio=4, compression_ratio=2, up_sample=True,
                 self_attention=True):
        super().__init__()
        self.self_attention = self_attention
        self.context_dim = context_dim
        up_resolutions = [[None, True if up_sample else None, None, None]] + [[None] * 4] * (num_blocks - 1)
        channels = ([(in_channels + cat_dim, in_channels)] + [(in_channels, in_channels)] * (num_blocks - 2)
                    + [(in_channels, out_channels)])
        attentions = [Kandinsky3AttentionBlock(out_channels, time_embed_dim, None, groups, head_dim,
                                               expansion_ratio) if self_attention else Identity()]
        resnets_in, resnets_out = [], []
        for (cin, cout), up in zip(channels, up_resolutions):
            resnets_in.append(Kandinsky3ResNetBlock(cin, cin, time_embed_dim, groups, compression_ratio, up))
            attentions.append(Kandinsky3AttentionBlock(cin, time_embed_dim, context_dim, groups, head_dim,
                                                       expansion_ratio) if context_dim is not None else Identity())
            resnets_out.append(Kandinsky3ResNetBlock(cin, cout, time_embed_dim, groups, compression_ratio))
        self.attentions = nn.CellList(attentions)
        self.resnets_in = nn.CellList(resnets_in)
        self.resnets_out = nn.CellList(resnets_out)

    def construct(self, x, time_embed, context=None, context_mask=None):
        for i in range(len(self.resnets_in)):
            x = self.resnets_in[i](x, time_embed)
            if self.context_dim is not None:
                x = self.attentions[i + 1](x, time_embed, context, context_mask)
            x = self.resnets_out[i](x, time_embed)
        if self.self_attention:
            x = self.attentions[0](x, time_embed)
        return x


class Kandinsky3UNet(nn.Cell):
    """__call__(sample (B, C, H, W), timestep, encoder_hidden_states (B, L, encoder_hid_dim),
    encoder_attention_mask (B, L) 1 = token / 0 = padding, optional) -> (B, C, H, W) Tensor.
    H and W must be multiples of 2 ** (len(block_out_channels) - 1)."""

    def __init__(self, config: Kandinsky3UNetConfig):
        super().__init__()
        self.config = config
        # On CPU, compute on numpy arrays (see the module docstring); False forces mindspore.ops.
        self.cpu_numpy_path = True
        channels = list(config.block_out_channels)
        init_channels = channels[0] // 2
        tdim, groups, head = config.time_embedding_dim, config.groups, config.attention_head_dim
        self.time_proj = Timesteps(init_channels, flip_sin_to_cos=False, downscale_freq_shift=1)
        self.time_embedding = TimestepEmbedding(init_channels, tdim)
        self.add_time_condition = Kandinsky3AttentionPooling(tdim, config.cross_attention_dim, head)
        self.conv_in = Conv2d(config.in_channels, init_channels, 3, padding=1)
        self.encoder_hid_proj = Kandinsky3EncoderProj(config.encoder_hid_dim, config.cross_attention_dim)

        hidden_dims = [init_channels] + channels
        in_out = list(zip(hidden_dims[:-1], hidden_dims[1:]))
        text_dims = [config.cross_attention_dim if on else None for on in ADD_CROSS_ATTENTION]
        self.num_levels = len(in_out)
        cat_dims = []
        down = []
        for level, ((cin, cout), text_dim, self_attn) in enumerate(zip(in_out, text_dims, ADD_SELF_ATTENTION)):
            last = level == self.num_levels - 1
            cat_dims.append(0 if last else cout)
            down.append(Kandinsky3DownSampleBlock(cin, cout, tdim, text_dim, config.layers_per_block, groups, head,
                                                  EXPANSION_RATIO, COMPRESSION_RATIO, not last, self_attn))
        up = []
        for level, ((cout, cin), text_dim, self_attn) in enumerate(zip(reversed(in_out), reversed(text_dims),
                                                                       reversed(ADD_SELF_ATTENTION))):
            up.append(Kandinsky3UpSampleBlock(cin, cat_dims.pop(), cout, tdim, text_dim, config.layers_per_block,
                                              groups, head, EXPANSION_RATIO, COMPRESSION_RATIO, level != 0,
                                              self_attn))
        self.down_blocks = nn.CellList(down)
        self.up_blocks = nn.CellList(up)
        self.conv_norm_out = GroupNorm(groups, init_channels)
        self.conv_out = Conv2d(init_channels, config.in_channels, 3, padding=1)

    @classmethod
    def from_config(cls, config: dict) -> "Kandinsky3UNet":
        kwargs = {}
        known = Kandinsky3UNetConfig.__dataclass_fields__
        for key, value in config.items():
            if key.startswith("_") or key not in known:
                continue
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        result = Kandinsky3UNetConfig(**kwargs)
        channels = result.block_out_channels
        if len(channels) != len(ADD_CROSS_ATTENTION):
            raise ValueError(f"Kandinsky3UNet config: block_out_channels must have {len(ADD_CROSS_ATTENTION)} "
                             f"entries (the attention layout per level is fixed); got {list(channels)}")
        for name in ("in_channels", "time_embedding_dim", "groups", "attention_head_dim", "layers_per_block",
                     "cross_attention_dim", "encoder_hid_dim"):
            value = getattr(result, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Kandinsky3UNet config: {name} must be a positive integer; got {value!r}")
        if not all(isinstance(c, int) and c > 0 for c in channels) or channels[0] % 2:
            raise ValueError(f"Kandinsky3UNet config: block_out_channels must be positive integers, the first "
                             f"even; got {list(channels)}")
        if result.layers_per_block < 2:
            raise ValueError("Kandinsky3UNet config: layers_per_block must be at least 2 (diffusers' up blocks "
                             f"need it); got {result.layers_per_block}")
        if result.time_embedding_dim % result.attention_head_dim or any(
                c % result.attention_head_dim for c in channels[1:]):
            raise ValueError("Kandinsky3UNet config: time_embedding_dim and block_out_channels[1:] must be "
                             f"multiples of attention_head_dim ({result.attention_head_dim})")
        return cls(result)

    @property
    def dtype(self):
        return self.conv_in.weight.dtype

    def construct(self, sample, timestep, encoder_hidden_states=None, encoder_attention_mask=None):
        b, _, h, w = sample.shape
        factor = 2 ** (self.num_levels - 1)
        if h % factor or w % factor:
            raise ValueError(f"sample height and width must be multiples of {factor}; got {h}x{w}")
        if encoder_hidden_states is None:
            raise ValueError("encoder_hidden_states (the T5 text states) is required by Kandinsky3UNet")
        t = np.asarray(timestep.asnumpy() if isinstance(timestep, Tensor) else timestep).reshape(-1)
        if t.dtype.kind not in "iuf":
            raise ValueError(f"timestep must be a number or a numeric tensor; got dtype {t.dtype}")
        if t.size == 1:
            t = np.repeat(t, b)
        elif t.size != b:
            raise ValueError(f"timestep must be a scalar or have one value per sample ({b}); got {t.size} values")
        host = self.cpu_numpy_path and on_cpu()

        def convert(x):
            if x is None:
                return None
            if host:
                return np.asarray(x.asnumpy() if isinstance(x, Tensor) else x, dtype=np.float32)
            x = x if isinstance(x, Tensor) else Tensor(np.asarray(x, dtype=np.float32))
            return x.astype(self.dtype) if x.dtype != self.dtype else x

        mask = None
        if encoder_attention_mask is not None:
            m = encoder_attention_mask.asnumpy() if isinstance(encoder_attention_mask, Tensor) \
                else np.asarray(encoder_attention_mask)
            # diffusers: (1 - mask) * -10000, one row per sample, broadcast over heads and queries
            mask = convert(((1 - m.astype(np.float32)) * np.float32(-10000.0)).reshape(b, 1, 1, -1))
        sample, context = convert(sample), convert(encoder_hidden_states)
        out = None
        if host:  # whole samples per core, one hand-off per step (backend/nn/host.py split_batch)
            out = split_batch(b, lambda start, stop: self._forward(
                sample[start:stop], t[start:stop], context[start:stop],
                None if mask is None else mask[start:stop]))
        if out is None:
            out = self._forward(sample, t, context, mask)
        if host:
            out = Tensor.from_numpy(np.ascontiguousarray(out))
            return out.astype(self.dtype) if self.dtype != ms.float32 else out
        return out

    def _forward(self, sample, timesteps, context, mask):
        t_emb = self.time_proj(timesteps)  # (B, C0) float32 numpy
        t_emb = t_emb if _host(sample) else Tensor(t_emb).astype(sample.dtype)
        time_embed = self.time_embedding(t_emb)  # (B, T)
        context = self.encoder_hid_proj(context)  # (B, L, cross_attention_dim)
        time_embed = self.add_time_condition(time_embed, context, mask)

        skips = []
        sample = self.conv_in(sample)
        for level, block in enumerate(self.down_blocks):
            sample = block(sample, time_embed, context, mask)
            if level != self.num_levels - 1:
                skips.append(sample)
            interrupt.check()  # a Stop takes effect between blocks, not after the whole step
        for level, block in enumerate(self.up_blocks):
            if level != 0:
                sample = concat([sample, skips.pop()], axis=1)
            sample = block(sample, time_embed, context, mask)
            interrupt.check()
        sample = self.conv_norm_out(sample, act=True)
        return self.conv_out(sample)
