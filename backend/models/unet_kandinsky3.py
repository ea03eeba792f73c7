"""Kandinsky3UNet, the Kandinsky 3 noise predictor (3.0B parameters in the published config).

Ported operation for operation from diffusers 0.35.2 `models/unets/unet_kandinsky3.py`
(Kandinsky3UNet and its blocks), with `models/attention_processor.py` Attention +
AttnProcessor2_0 as these blocks configure it (no biases in q/k/v/out, scale 1/sqrt(head_dim),
additive mask over the text tokens). Attribute paths equal the diffusers checkpoint keys
(`down_blocks.1.attentions.2.attention.to_q.weight`, `up_blocks.0.resnets_in.0.resnet_blocks.1.
up_sample.weight`, `add_time_condition.attention.to_out.0.weight`, ...). diffusers' `nn.Identity`
entries of its ModuleLists are kept as parameter-free cells so the indices stay the same.
The layers (convs, norms, linears, the attention kernel, timestep embeddings) are backend/nn's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, nn

from backend import interrupt
from backend.nn import (Conv2d, ConvTranspose2d, GroupNorm, Identity, LayerNorm, Linear, Model, SiLU,
                        TimestepEmbedding, Timesteps, add_, batch_timesteps, concat, run_model,
                        scaled_dot_product_attention, silu)

# Hard-coded in diffusers' Kandinsky3UNet (its "TODO: put into config").
EXPANSION_RATIO = 4  # feed-forward width / channels in the attention blocks
COMPRESSION_RATIO = 2  # resnet hidden width = max(in, out) / this
ADD_CROSS_ATTENTION = (False, True, True, True)  # per level (down blocks from the first, up blocks from the last)
ADD_SELF_ATTENTION = (False, True, True, True)  # per level (likewise)


@dataclass
class Kandinsky3UNetConfig:
    """Fields of diffusers' Kandinsky3UNet config.json (defaults are diffusers', = the published config)."""

    in_channels: int = 4  # latent channels in and out
    time_embedding_dim: int = 1536  # width of the time embedding every norm is conditioned on
    groups: int = 32  # groups of every GroupNorm
    attention_head_dim: int = 64  # width of one attention head (heads = channels // this)
    layers_per_block: int = 3  # resnet(+attention) pairs per level
    block_out_channels: tuple = (384, 768, 1536, 3072)  # channels per level (1 to 4 levels)
    cross_attention_dim: int = 4096  # width of the projected text tokens
    encoder_hid_dim: int = 4096  # width of the text encoder's states (T5: d_model)


class Attention(nn.Cell):
    """diffusers Attention(query_dim, cross_attention_dim, dim_head, out_dim, out_bias=False) with
    AttnProcessor2_0: out_dim // dim_head heads of out_dim / heads channels each (dim_head itself
    when it divides out_dim), no biases, scale 1/sqrt(channels per head)."""

    def __init__(self, query_dim: int, cross_attention_dim: int, dim_head: int, out_dim: int):
        super().__init__()
        self.heads = out_dim // dim_head
        if self.heads == 0 or out_dim % self.heads:
            raise ValueError(f"attention over {out_dim} channels: attention_head_dim {dim_head} gives "
                             f"{self.heads} heads, which do not split them evenly (diffusers' attention "
                             "cannot reshape them either)")
        self.dim_head = out_dim // self.heads
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
        q = self.to_q(hidden_states).reshape(b, n, h, d).swapaxes(1, 2)  # (B, h, N, d)
        k = self.to_k(context).reshape(b, m, h, d).swapaxes(1, 2)
        v = self.to_v(context).reshape(b, m, h, d).swapaxes(1, 2)
        out = scaled_dot_product_attention(q, k, v, mask)  # (B, h, N, d)
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
    (context_mlp = Sequential(SiLU, Linear)); an optional SiLU after, fused into the norm."""

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
        self.up_sample = ConvTranspose2d(in_channels, in_channels, 2, stride=2) if up_resolution else None
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
        self.shortcut_up_sample = (ConvTranspose2d(in_channels, in_channels, 2, stride=2)
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
        return add_(out, x)


class Kandinsky3AttentionPooling(nn.Cell):
    """Adds attention(mean of the text tokens -> the tokens) to the time embedding."""

    def __init__(self, num_channels: int, context_dim: int, head_dim: int = 64):
        super().__init__()
        self.attention = Attention(context_dim, context_dim, head_dim, num_channels)

    def construct(self, x, context, context_mask=None):
        query = context.mean(axis=1).reshape(context.shape[0], 1, -1)  # (B, 1, C)
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
        out = self.in_norm(x, time_embed).reshape(b, c, h * w).swapaxes(1, 2)  # (B, N, C)
        if context is None:  # self-attention: the normalized pixels, no mask
            context, context_mask = out, None
        out = self.attention(out, context, context_mask)  # (B, N, C)
        x = x + out.swapaxes(1, 2).reshape(b, c, h, w)
        out = self.feed_forward[2](silu(self.feed_forward[0](self.out_norm(x, time_embed))))
        return add_(out, x)


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


class Kandinsky3UNet(Model):
    """__call__(sample (B, C, H, W), timestep, encoder_hidden_states (B, L, encoder_hid_dim),
    encoder_attention_mask (B, L) 1 = token / 0 = padding, optional) -> (B, C, H, W)
    (backend/nn/entry.py run_model: numpy on the host path). H and W must be multiples of
    2 ** (len(block_out_channels) - 1)."""

    def __init__(self, config: Kandinsky3UNetConfig):
        super().__init__()
        self.config = config
        channels = list(config.block_out_channels)
        init_channels = channels[0] // 2
        tdim, groups, head = config.time_embedding_dim, config.groups, config.attention_head_dim
        self.time_proj = Timesteps(init_channels, flip_sin_to_cos=False, downscale_freq_shift=1)
        self.time_embedding = TimestepEmbedding(init_channels, tdim)
        self.add_time_condition = Kandinsky3AttentionPooling(tdim, config.cross_attention_dim, head)
        self.conv_in = Conv2d(config.in_channels, init_channels, 3, padding=1)
        self.encoder_hid_proj = Kandinsky3EncoderProj(config.encoder_hid_dim, config.cross_attention_dim)

        # As diffusers builds it: the per-level attention flags are read from the start of the
        # 4-tuples for the down blocks and from their end for the up blocks (with fewer than 4
        # levels the two sides differ).
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
        """Every config diffusers 0.35.2 builds and runs; what it cannot run is refused here."""
        kwargs = {}
        known = Kandinsky3UNetConfig.__dataclass_fields__
        for key, value in config.items():
            if key.startswith("_") or key not in known:
                continue
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        result = Kandinsky3UNetConfig(**kwargs)
        for name in ("in_channels", "time_embedding_dim", "groups", "attention_head_dim", "layers_per_block",
                     "cross_attention_dim", "encoder_hid_dim"):
            value = getattr(result, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Kandinsky3UNet config: {name} must be a positive integer; got {value!r}")
        channels = result.block_out_channels
        if (not 1 <= len(channels) <= 4 or not all(isinstance(c, int) and c > 0 for c in channels)
                or channels[0] < 2):
            # diffusers builds more levels, but its forward then fails: the up blocks are built for
            # one skip connection more than the forward concatenates
            raise ValueError(f"Kandinsky3UNet config: block_out_channels must be 1 to 4 positive integers, the "
                             f"first at least 2 (conv_in has half as many channels); got {list(channels)}")
        if result.layers_per_block < 2:
            # diffusers builds it, but its up blocks then output the wrong width and its forward fails
            raise ValueError("Kandinsky3UNet config: layers_per_block must be at least 2 (diffusers' up blocks "
                             f"need it); got {result.layers_per_block}")
        try:
            return cls(result)
        except ValueError as error:  # a GroupNorm or an attention that the widths do not fit
            raise ValueError(f"Kandinsky3UNet config (groups={result.groups}, attention_head_dim="
                             f"{result.attention_head_dim}, block_out_channels={list(channels)}, "
                             f"time_embedding_dim={result.time_embedding_dim}): {error}") from error

    def construct(self, sample, timestep, encoder_hidden_states=None, encoder_attention_mask=None):
        b, _, h, w = sample.shape
        factor = 2 ** (self.num_levels - 1)
        if h % factor or w % factor:
            raise ValueError(f"sample height and width must be multiples of {factor}; got {h}x{w}")
        if encoder_hidden_states is None:
            raise ValueError("encoder_hidden_states (the T5 text states) is required by Kandinsky3UNet")
        t_emb = self.time_proj(batch_timesteps(timestep, b))  # (B, C0) float32
        mask = None
        if encoder_attention_mask is not None:
            m = encoder_attention_mask
            m = m.asnumpy() if isinstance(m, Tensor) else np.asarray(m)
            # diffusers: (1 - mask) * -10000, one row per sample, broadcast over heads and queries
            mask = ((1 - m.astype(np.float32)) * np.float32(-10000.0)).reshape(b, 1, 1, -1)
        return run_model(self, self._forward, sample, t_emb, encoder_hidden_states, mask)

    def _forward(self, sample, t_emb, context, mask):
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
