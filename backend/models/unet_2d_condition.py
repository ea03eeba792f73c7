"""UNet2DConditionModel as the Kandinsky 2.1 and 2.2 decoders use it.

Ported operation for operation from diffusers 0.35.2:
  models/unets/unet_2d_condition.py   UNet2DConditionModel (forward, embeddings set-up)
  models/unets/unet_2d_blocks.py      ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D,
                                      UNetMidBlock2DSimpleCrossAttn, SimpleCrossAttnUpBlock2D,
                                      ResnetUpsampleBlock2D
  models/resnet.py                    ResnetBlock2D (time_embedding_norm "scale_shift"/"default",
                                      nearest up / average-pool down inside the block)
  models/embeddings.py                ImageProjection, ImageTimeEmbedding, ImageHintTimeEmbedding,
                                      TextImageProjection, TextImageTimeEmbedding
  models/attention_processor.py       Attention with added_kv_proj_dim + AttnAddedKVProcessor2_0
The layers (convs, norms, linears, the attention kernel, Timesteps / TimestepEmbedding) are
backend/nn's; this file is the architecture.

Only the block types used by the published Kandinsky 2.x configs are implemented; any other
config value that changes the architecture raises ValueError in `from_config`.
Attribute paths equal the diffusers checkpoint keys (`down_blocks.1.attentions.0.to_q.weight`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from mindspore import nn

from backend import interrupt
from backend.nn import (Conv2d, GroupNorm, LayerNorm, Linear, Model, SiLU, TimestepEmbedding, Timesteps, add_,
                        avg_pool_2x, batch_timesteps, concat, get_activation, run_model,
                        scaled_dot_product_attention, silu, upsample_nearest_2x)


# --- Config ---------------------------------------------------------------------------------------

DOWN_BLOCK_TYPES = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DSimpleCrossAttn",)
UP_BLOCK_TYPES = ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")
ADDITION_EMBED_TYPES = (None, "image", "image_hint", "text_image")
ENCODER_HID_DIM_TYPES = (None, "image_proj", "text_image_proj", "text_proj")


@dataclass
class UNet2DConditionConfig:
    # latent channels in (4; 9 for inpainting = latents + masked-image latents + mask; 8 for
    # ControlNet = latents + 4 hint channels appended inside the model)
    in_channels: int = 4
    # predicted channels (8 for Kandinsky: noise + learned variance)
    out_channels: int = 4
    # map the sample from [0, 1] to [-1, 1] before conv_in
    center_input_sample: bool = False
    # sinusoidal timestep embedding: cos first, then sin
    flip_sin_to_cos: bool = True
    # `downscale_freq_shift` of the sinusoidal embedding
    freq_shift: float = 0
    # one entry per resolution, highest resolution first
    down_block_types: tuple = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                               "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D")
    mid_block_type: str = "UNetMidBlock2DSimpleCrossAttn"
    # one entry per resolution, lowest resolution first
    up_block_types: tuple = ("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                             "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")
    # attention without self keys/values (only the added encoder keys/values), per down block
    only_cross_attention: bool | tuple = False
    # the mid block's only_cross_attention (None: only_cross_attention if that is a bool, else False)
    mid_block_only_cross_attention: bool | None = None
    # channels of each resolution level
    block_out_channels: tuple = (384, 768, 1152, 1536)
    # resnets per down block (the up blocks have one more)
    layers_per_block: int | tuple = 3
    # divisor of the mid block's resnet outputs
    mid_block_scale_factor: float = 1.0
    # activation of resnets, time embedding and output
    act_fn: str = "silu"
    # groups of every GroupNorm
    norm_num_groups: int = 32
    # epsilon of every resnet GroupNorm and conv_norm_out
    norm_eps: float = 1e-5
    # width of the encoder hidden states after encoder_hid_proj (the added key/value input)
    cross_attention_dim: int = 768
    # width of the input of encoder_hid_proj (image embeddings for 2.2, text states for 2.1)
    encoder_hid_dim: int | None = 1280
    # how encoder_hidden_states are built: "image_proj" (2.2), "text_image_proj" (2.1)
    encoder_hid_dim_type: str | None = "image_proj"
    # diffusers' misnamed field: it is the dimension per head here (see diffusers issue 2011)
    attention_head_dim: int | tuple = 64
    # extra embedding added to the time embedding: "image" / "image_hint" (2.2), "text_image" (2.1)
    addition_embed_type: str | None = "image"
    # heads of the additional embedding's pooling; unused by the Kandinsky embedding types
    addition_embed_type_num_heads: int = 64
    # "scale_shift": the time embedding scales and shifts norm2's output; "default": adds to conv1
    resnet_time_scale_shift: str = "scale_shift"
    # skip the activation before each resnet's time_emb_proj
    resnet_skip_time_act: bool = False
    # divisor of the resnet outputs inside the down / up blocks
    resnet_out_scale_factor: float = 1.0
    # width of the time embedding (None: 4 * block_out_channels[0])
    time_embedding_dim: int | None = None
    # activation applied to the summed time embedding before the blocks
    time_embedding_act_fn: str | None = None
    # activation after TimestepEmbedding.linear_2
    timestep_post_act: str | None = None
    # kernel sizes of conv_in and conv_out
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # the default latent size the checkpoint was trained at; informational
    sample_size: int | None = 64

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4


# Fields that must keep the value given here, because only that architecture is implemented.
_FIXED_FIELDS = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False, None),
    "dual_cross_attention": (False, None),
    "time_embedding_type": ("positional",),
    "time_cond_proj_dim": (None,),
    "cross_attention_norm": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "num_attention_heads": (None,),
    "addition_time_embed_dim": (None,),
    "attention_type": ("default",),
    "transformer_layers_per_block": (1,),
    "reverse_transformer_layers_per_block": (None,),
    "dropout": (0.0, 0),
}
# Fields that don't change what the blocks used here compute.
_IGNORED_FIELDS = {
    # only read by CrossAttnDownBlock2D-style blocks (Transformer2DModel), not by SimpleCrossAttn
    "use_linear_projection", "upcast_attention",
    # the Simple*/Resnet* blocks ignore the padding of a conv downsampler (they average-pool)
    "downsample_padding",
}


def _per_block(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must have one entry per down block ({n}); got {list(value)}")
        return tuple(value)
    return (value,) * n


# --- Embeddings (models/embeddings.py) ------------------------------------------------------------

class ImageProjection(nn.Cell):
    """Kandinsky 2.2 encoder_hid_proj: image embedding (B, D) -> 32 tokens (B, 32, cross_dim)."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_image_text_embeds: int = 32):
        super().__init__()
        self.num_image_text_embeds = num_image_text_embeds
        self.image_embeds = Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.norm = LayerNorm(cross_attention_dim)

    def construct(self, image_embeds):
        batch = image_embeds.shape[0]
        tokens = self.image_embeds(image_embeds)
        tokens = tokens.reshape(batch, self.num_image_text_embeds, -1)  # (B, 32, cross_dim)
        return self.norm(tokens)


class TextImageProjection(nn.Cell):
    """Kandinsky 2.1 encoder_hid_proj: 10 image tokens followed by the projected text states."""

    def __init__(self, text_embed_dim: int, image_embed_dim: int, cross_attention_dim: int,
                 num_image_text_embeds: int = 10):
        super().__init__()
        self.num_image_text_embeds = num_image_text_embeds
        self.image_embeds = Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.text_proj = Linear(text_embed_dim, cross_attention_dim)

    def construct(self, text_embeds, image_embeds):
        batch = text_embeds.shape[0]
        image_tokens = self.image_embeds(image_embeds).reshape(batch, self.num_image_text_embeds, -1)
        text_tokens = self.text_proj(text_embeds)  # (B, L, cross_dim)
        return concat([image_tokens, text_tokens], axis=1)  # (B, 10 + L, cross_dim)


class ImageTimeEmbedding(nn.Cell):
    def __init__(self, image_embed_dim: int, time_embed_dim: int):
        super().__init__()
        self.image_proj = Linear(image_embed_dim, time_embed_dim)
        self.image_norm = LayerNorm(time_embed_dim)

    def construct(self, image_embeds):
        return self.image_norm(self.image_proj(image_embeds))


class ImageHintTimeEmbedding(nn.Cell):
    """Kandinsky 2.2 ControlNet: image embedding -> time embedding, hint (B, 3, 8H, 8W) -> (B, 4, H, W)."""

    def __init__(self, image_embed_dim: int, time_embed_dim: int):
        super().__init__()
        self.image_proj = Linear(image_embed_dim, time_embed_dim)
        self.image_norm = LayerNorm(time_embed_dim)
        # torch nn.Sequential of conv/SiLU pairs: the convs sit at even indices (checkpoint keys
        # input_hint_block.0, .2, ..., .14).
        specs = [(3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1),
                 (96, 256, 2), (256, 4, 1)]
        cells = []
        for i, (cin, cout, stride) in enumerate(specs):
            cells.append(Conv2d(cin, cout, 3, stride=stride, padding=1))
            if i < len(specs) - 1:
                cells.append(SiLU())
        self.input_hint_block = nn.SequentialCell(cells)

    def construct(self, image_embeds, hint):
        time_image_embeds = self.image_norm(self.image_proj(image_embeds))
        return time_image_embeds, self.input_hint_block(hint)


class TextImageTimeEmbedding(nn.Cell):
    def __init__(self, text_embed_dim: int, image_embed_dim: int, time_embed_dim: int):
        super().__init__()
        self.text_proj = Linear(text_embed_dim, time_embed_dim)
        self.text_norm = LayerNorm(time_embed_dim)
        self.image_proj = Linear(image_embed_dim, time_embed_dim)

    def construct(self, text_embeds, image_embeds):
        time_text_embeds = self.text_norm(self.text_proj(text_embeds))
        time_image_embeds = self.image_proj(image_embeds)
        return time_image_embeds + time_text_embeds


# --- ResnetBlock2D (models/resnet.py) with nearest-upsample / average-pool inside -----------------

class ResnetBlock2D(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 time_embedding_norm: str = "scale_shift", output_scale_factor: float = 1.0,
                 skip_time_act: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"resnet_time_scale_shift must be 'default' or 'scale_shift'; "
                             f"got {time_embedding_norm!r}")
        self.out_channels = out_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.skip_time_act = skip_time_act
        self.up = up
        self.down = down
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        proj_out = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
        self.time_emb_proj = Linear(temb_channels, proj_out)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def construct(self, input_tensor, temb):
        hidden = self.norm1(input_tensor, act=True)
        if self.up:
            input_tensor = upsample_nearest_2x(input_tensor)
            hidden = upsample_nearest_2x(hidden)
        elif self.down:
            input_tensor = avg_pool_2x(input_tensor)
            hidden = avg_pool_2x(hidden)
        hidden = self.conv1(hidden)

        if not self.skip_time_act:
            temb = silu(temb)
        temb = self.time_emb_proj(temb)  # (B, proj_out)
        if self.time_embedding_norm == "default":
            hidden = self.norm2(hidden + temb[:, :, None, None], act=True)
        else:
            scale, shift = temb[:, :self.out_channels], temb[:, self.out_channels:]
            hidden = self.norm2(hidden, scale=scale, shift=shift, act=True)
        hidden = self.conv2(hidden)

        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        out = add_(hidden, input_tensor)
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


# --- Attention with added key/value projections (attention_processor.py, AttnAddedKVProcessor2_0) ---

class Attention(nn.Cell):
    """Self-attention over the pixels whose keys/values are prefixed by the encoder's tokens.

    keys   = [add_k_proj(encoder_hidden_states), to_k(group_norm(x))]   (encoder first)
    values = [add_v_proj(encoder_hidden_states), to_v(group_norm(x))]
    out    = x + to_out.0(softmax(q k^T / sqrt(d)) v)
    With only_cross_attention the self keys/values are left out. Computed channels-first
    ((B, channels, tokens), the feature map's own layout), so nothing is transposed in memory.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, added_kv_proj_dim: int,
                 norm_num_groups: int, only_cross_attention: bool = False, eps: float = 1e-5):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.only_cross_attention = only_cross_attention
        self.group_norm = GroupNorm(norm_num_groups, query_dim, eps=eps)
        self.to_q = Linear(query_dim, inner_dim)
        if only_cross_attention:
            self.to_k = None
            self.to_v = None
        else:
            self.to_k = Linear(query_dim, inner_dim)
            self.to_v = Linear(query_dim, inner_dim)
        self.add_k_proj = Linear(added_kv_proj_dim, inner_dim)
        self.add_v_proj = Linear(added_kv_proj_dim, inner_dim)
        # torch ModuleList [Linear, Dropout]: only index 0 has parameters.
        self.to_out = nn.CellList([Linear(inner_dim, query_dim)])

    def construct(self, hidden_states, encoder_hidden_states=None):
        b, c, h, w = hidden_states.shape
        n = h * w
        x = hidden_states.reshape(b, c, n)
        normed = self.group_norm(x)  # (B, C, N)
        if encoder_hidden_states is None:
            # diffusers uses the un-normalized pixels as the "encoder" states in this case
            encoder_hidden_states = x.swapaxes(1, 2)
        # the 1/sqrt(d) of the scores applied to the (smaller) query
        query = self.to_q.channels_first(normed) * self.scale  # (B, h*d, N)
        key = self.add_k_proj(encoder_hidden_states).swapaxes(1, 2)  # (B, h*d, L)
        value = self.add_v_proj(encoder_hidden_states).swapaxes(1, 2)
        if not self.only_cross_attention:
            key = concat([key, self.to_k.channels_first(normed)], axis=2)  # (B, h*d, L+N)
            value = concat([value, self.to_v.channels_first(normed)], axis=2)
        m = key.shape[2]
        heads, d = self.heads, self.dim_head
        out = scaled_dot_product_attention(query.reshape(b, heads, d, n), key.reshape(b, heads, d, m),
                                           value.reshape(b, heads, d, m), scale=1.0,
                                           channels_first=True)  # (B, h, d, N)
        out = self.to_out[0].channels_first(out.reshape(b, heads * d, n))  # (B, C, N)
        return add_(out, x).reshape(b, c, h, w)


# --- Blocks (unets/unet_2d_blocks.py) -------------------------------------------------------------

def _attentions(num_layers: int, channels: int, resnet_kwargs: dict, attention: tuple | None):
    """One Attention per resnet; `attention` is (attention_head_dim, cross_attention_dim,
    only_cross_attention), None for the blocks without attention."""
    if attention is None:
        return None
    head_dim, cross_attention_dim, only_cross_attention = attention
    return nn.CellList([Attention(channels, channels // head_dim, head_dim, cross_attention_dim,
                                  resnet_kwargs["groups"], only_cross_attention) for _ in range(num_layers)])


class ResnetDownsampleBlock2D(nn.Cell):
    """Resnets, then a resnet that average-pools. SimpleCrossAttnDownBlock2D: an attention after
    each resnet. Returns the output and the states the up blocks take as skips."""

    def __init__(self, num_layers: int, in_channels: int, out_channels: int, temb_channels: int,
                 add_downsample: bool, resnet_kwargs: dict, attention: tuple | None = None):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                          **resnet_kwargs)
            for i in range(num_layers)])
        self.attentions = _attentions(num_layers, out_channels, resnet_kwargs, attention)
        self.downsamplers = (nn.CellList([ResnetBlock2D(out_channels, out_channels, temb_channels,
                                                        down=True, **resnet_kwargs)])
                             if add_downsample else None)

    def construct(self, hidden_states, temb, encoder_hidden_states=None):
        output_states = []
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, encoder_hidden_states)
            output_states.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states, temb)
            output_states.append(hidden_states)
        return hidden_states, output_states


class SimpleCrossAttnDownBlock2D(ResnetDownsampleBlock2D):
    def __init__(self, num_layers: int, in_channels: int, out_channels: int, temb_channels: int,
                 add_downsample: bool, resnet_kwargs: dict, attention_head_dim: int,
                 cross_attention_dim: int, only_cross_attention: bool):
        super().__init__(num_layers, in_channels, out_channels, temb_channels, add_downsample, resnet_kwargs,
                         (attention_head_dim, cross_attention_dim, only_cross_attention))


class UNetMidBlock2DSimpleCrossAttn(nn.Cell):
    def __init__(self, in_channels: int, temb_channels: int, resnet_kwargs: dict, attention_head_dim: int,
                 cross_attention_dim: int, only_cross_attention: bool, num_layers: int = 1):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(in_channels, in_channels, temb_channels, **resnet_kwargs)
                                    for _ in range(num_layers + 1)])
        self.attentions = _attentions(num_layers, in_channels, resnet_kwargs,
                                      (attention_head_dim, cross_attention_dim, only_cross_attention))

    def construct(self, hidden_states, temb, encoder_hidden_states=None):
        hidden_states = self.resnets[0](hidden_states, temb)
        for i, attn in enumerate(self.attentions):
            hidden_states = attn(hidden_states, encoder_hidden_states)
            hidden_states = self.resnets[i + 1](hidden_states, temb)
        return hidden_states


class ResnetUpsampleBlock2D(nn.Cell):
    """Resnets over [state, skip] concatenations, then a resnet that up-samples (nearest 2x).
    SimpleCrossAttnUpBlock2D: an attention after each resnet."""

    def __init__(self, num_layers: int, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int, add_upsample: bool, resnet_kwargs: dict, attention: tuple | None = None):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            res_skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in_channels = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock2D(resnet_in_channels + res_skip_channels, out_channels,
                                         temb_channels, **resnet_kwargs))
        self.resnets = nn.CellList(resnets)
        self.attentions = _attentions(num_layers, out_channels, resnet_kwargs, attention)
        self.upsamplers = (nn.CellList([ResnetBlock2D(out_channels, out_channels, temb_channels,
                                                      up=True, **resnet_kwargs)])
                           if add_upsample else None)

    def construct(self, hidden_states, res_hidden_states, temb, encoder_hidden_states=None):
        for i, resnet in enumerate(self.resnets):
            hidden_states = concat([hidden_states, res_hidden_states.pop()], axis=1)
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, encoder_hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, temb)
        return hidden_states


class SimpleCrossAttnUpBlock2D(ResnetUpsampleBlock2D):
    def __init__(self, num_layers: int, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int, add_upsample: bool, resnet_kwargs: dict, attention_head_dim: int,
                 cross_attention_dim: int, only_cross_attention: bool):
        super().__init__(num_layers, in_channels, prev_output_channel, out_channels, temb_channels, add_upsample,
                         resnet_kwargs, (attention_head_dim, cross_attention_dim, only_cross_attention))


# --- The model (unets/unet_2d_condition.py) -------------------------------------------------------

class UNet2DConditionModel(Model):
    """Noise predictor of the Kandinsky 2.x decoders.

    __call__(sample (B, C, H, W), timestep, encoder_hidden_states=None, added_cond_kwargs=None)
    -> (B, out_channels, H, W). H and W must be multiples of 2 ** (len(block_out_channels) - 1).
    """

    def __init__(self, config: UNet2DConditionConfig):
        super().__init__()
        self.config = config
        n_blocks = len(config.down_block_types)
        if len(config.up_block_types) != n_blocks or len(config.block_out_channels) != n_blocks:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have the "
                             f"same length; got {len(config.down_block_types)}, "
                             f"{len(config.up_block_types)}, {len(config.block_out_channels)}")
        for name in config.down_block_types:
            if name not in DOWN_BLOCK_TYPES:
                raise ValueError(f"down block type {name!r} is not supported; use one of {DOWN_BLOCK_TYPES}")
        for name in config.up_block_types:
            if name not in UP_BLOCK_TYPES:
                raise ValueError(f"up block type {name!r} is not supported; use one of {UP_BLOCK_TYPES}")
        if config.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"mid_block_type {config.mid_block_type!r} is not supported; "
                             f"use one of {MID_BLOCK_TYPES}")
        if config.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"addition_embed_type {config.addition_embed_type!r} is not supported; "
                             f"use one of {ADDITION_EMBED_TYPES}")
        if config.encoder_hid_dim_type not in ENCODER_HID_DIM_TYPES:
            raise ValueError(f"encoder_hid_dim_type {config.encoder_hid_dim_type!r} is not supported; "
                             f"use one of {ENCODER_HID_DIM_TYPES}")
        if config.act_fn not in ("silu", "swish"):  # the resnets' activation is fused into their group norms
            raise ValueError(f"act_fn must be 'silu' (or 'swish'); got {config.act_fn!r}")
        block_out = tuple(config.block_out_channels)
        # None means one head of the block's full width (resolved per block below, as diffusers does)
        head_dims = _per_block(config.attention_head_dim, n_blocks, "attention_head_dim")
        if head_dims[-1] is None:
            raise ValueError("attention_head_dim of the last block must be set (the mid block needs it)")
        layers_per_block = _per_block(config.layers_per_block, n_blocks, "layers_per_block")
        only_cross = _per_block(config.only_cross_attention, n_blocks, "only_cross_attention")
        mid_only_cross = config.mid_block_only_cross_attention
        if mid_only_cross is None:
            mid_only_cross = (config.only_cross_attention
                              if isinstance(config.only_cross_attention, bool) else False)
        cross_dim = config.cross_attention_dim
        time_embed_dim = config.time_embed_dim
        self.num_upsamplers = n_blocks - 1

        self.conv_in = Conv2d(config.in_channels, block_out[0], config.conv_in_kernel,
                              padding=(config.conv_in_kernel - 1) // 2)

        # time
        self.time_proj = Timesteps(block_out[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(block_out[0], time_embed_dim, act_fn=config.act_fn,
                                                post_act_fn=config.timestep_post_act)
        self.time_embed_act = get_activation(config.time_embedding_act_fn)

        # encoder hidden states (the added key/value input of every attention)
        hid_type = config.encoder_hid_dim_type
        if hid_type is None and config.encoder_hid_dim is not None:
            hid_type = "text_proj"  # what diffusers infers
        if hid_type is not None and config.encoder_hid_dim is None:
            raise ValueError(f"encoder_hid_dim must be set when encoder_hid_dim_type is {hid_type!r}")
        self.encoder_hid_dim_type = hid_type
        if hid_type == "image_proj":
            self.encoder_hid_proj = ImageProjection(config.encoder_hid_dim, cross_dim)
        elif hid_type == "text_image_proj":
            self.encoder_hid_proj = TextImageProjection(config.encoder_hid_dim, cross_dim, cross_dim)
        elif hid_type == "text_proj":
            self.encoder_hid_proj = Linear(config.encoder_hid_dim, cross_dim)
        else:
            self.encoder_hid_proj = None

        # additional embedding summed into the time embedding
        add_type = config.addition_embed_type
        if add_type in ("image", "image_hint") and config.encoder_hid_dim is None:
            raise ValueError(f"encoder_hid_dim must be set when addition_embed_type is {add_type!r}")
        if add_type == "image":
            self.add_embedding = ImageTimeEmbedding(config.encoder_hid_dim, time_embed_dim)
        elif add_type == "image_hint":
            self.add_embedding = ImageHintTimeEmbedding(config.encoder_hid_dim, time_embed_dim)
        elif add_type == "text_image":
            self.add_embedding = TextImageTimeEmbedding(cross_dim, cross_dim, time_embed_dim)
        else:
            self.add_embedding = None

        resnet_kwargs = dict(groups=config.norm_num_groups, eps=config.norm_eps,
                             time_embedding_norm=config.resnet_time_scale_shift,
                             output_scale_factor=config.resnet_out_scale_factor,
                             skip_time_act=config.resnet_skip_time_act)

        down_blocks = []
        output_channel = block_out[0]
        for i, block_type in enumerate(config.down_block_types):
            input_channel, output_channel = output_channel, block_out[i]
            add_downsample = i != n_blocks - 1
            if block_type == "ResnetDownsampleBlock2D":
                block = ResnetDownsampleBlock2D(layers_per_block[i], input_channel, output_channel,
                                                time_embed_dim, add_downsample, resnet_kwargs)
            else:
                block = SimpleCrossAttnDownBlock2D(layers_per_block[i], input_channel, output_channel,
                                                   time_embed_dim, add_downsample, resnet_kwargs,
                                                   head_dims[i] or output_channel, cross_dim, only_cross[i])
            down_blocks.append(block)
        self.down_blocks = nn.CellList(down_blocks)

        mid_kwargs = dict(resnet_kwargs, output_scale_factor=config.mid_block_scale_factor)
        self.mid_block = UNetMidBlock2DSimpleCrossAttn(block_out[-1], time_embed_dim, mid_kwargs,
                                                       head_dims[-1], cross_dim, mid_only_cross)

        up_blocks = []
        rev_out = list(reversed(block_out))
        rev_layers = list(reversed(layers_per_block))
        rev_only_cross = list(reversed(only_cross))
        output_channel = rev_out[0]
        for i, block_type in enumerate(config.up_block_types):
            prev_output_channel, output_channel = output_channel, rev_out[i]
            input_channel = rev_out[min(i + 1, n_blocks - 1)]
            add_upsample = i != n_blocks - 1
            if block_type == "ResnetUpsampleBlock2D":
                block = ResnetUpsampleBlock2D(rev_layers[i] + 1, input_channel, prev_output_channel,
                                              output_channel, time_embed_dim, add_upsample, resnet_kwargs)
            else:
                # diffusers indexes attention_head_dim unreversed for the up blocks
                block = SimpleCrossAttnUpBlock2D(rev_layers[i] + 1, input_channel, prev_output_channel,
                                                 output_channel, time_embed_dim, add_upsample, resnet_kwargs,
                                                 head_dims[i] or output_channel, cross_dim,
                                                 rev_only_cross[i])
            up_blocks.append(block)
        self.up_blocks = nn.CellList(up_blocks)

        self.conv_norm_out = GroupNorm(config.norm_num_groups, block_out[0], eps=config.norm_eps)
        self.conv_out = Conv2d(block_out[0], config.out_channels, config.conv_out_kernel,
                               padding=(config.conv_out_kernel - 1) // 2)

    @classmethod
    def from_config(cls, config: dict) -> "UNet2DConditionModel":
        known = {f.name for f in fields(UNet2DConditionConfig)}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED_FIELDS:
                continue
            if key in _FIXED_FIELDS:
                if value not in _FIXED_FIELDS[key]:
                    raise ValueError(f"UNet config {key}={value!r} is not supported "
                                     f"(supported: {_FIXED_FIELDS[key]})")
                continue
            if key in known:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(UNet2DConditionConfig(**kwargs))

    # ---- forward helpers -----------------------------------------------------------------

    def _cond(self, added_cond_kwargs: dict | None, name: str, why: str):
        if not added_cond_kwargs or added_cond_kwargs.get(name) is None:
            raise ValueError(f"added_cond_kwargs[{name!r}] is required: {why}")
        return added_cond_kwargs[name]

    def construct(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None):
        """sample (B, C, H, W), timestep (number or (B,) / scalar), optional (B, L, D)
        encoder_hidden_states (Kandinsky 2.1 text states), added_cond_kwargs {"image_embeds" (B, D),
        "hint" (B, 3, 8H, 8W), "text_embeds" (B, D)} (numpy arrays or Tensors)
        -> (B, out_channels, H, W) (backend/nn/entry.py run_model: numpy on the host path)."""
        b, _, h, w = sample.shape
        factor = 2 ** self.num_upsamplers
        if h % factor or w % factor:
            raise ValueError(f"sample height and width must be multiples of {factor}; got {h}x{w}")
        t_emb = self.time_proj(batch_timesteps(timestep, b))  # (B, C0) float32
        return run_model(self, self._forward, sample, t_emb, encoder_hidden_states, added_cond_kwargs or {})

    def _forward(self, sample, t_emb, encoder_hidden_states, added_cond_kwargs):
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. time (+ additional) embedding
        emb = self.time_embedding(t_emb)  # (B, T)

        add_type = self.config.addition_embed_type
        if add_type == "image":
            image_embeds = self._cond(added_cond_kwargs, "image_embeds", "addition_embed_type is 'image'")
            emb = emb + self.add_embedding(image_embeds)
        elif add_type == "image_hint":
            why = "addition_embed_type is 'image_hint'"
            image_embeds = self._cond(added_cond_kwargs, "image_embeds", why)
            hint = self._cond(added_cond_kwargs, "hint", why)
            aug_emb, hint = self.add_embedding(image_embeds, hint)
            sample = concat([sample, hint], axis=1)
            emb = emb + aug_emb
        elif add_type == "text_image":
            image_embeds = self._cond(added_cond_kwargs, "image_embeds",
                                      "addition_embed_type is 'text_image'")
            text_embeds = added_cond_kwargs.get("text_embeds")
            if text_embeds is None:
                text_embeds = encoder_hidden_states
            emb = emb + self.add_embedding(text_embeds, image_embeds)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)

        # encoder hidden states: the tokens every attention attends to besides the pixels
        hid_type = self.encoder_hid_dim_type
        if hid_type == "image_proj":
            image_embeds = self._cond(added_cond_kwargs, "image_embeds",
                                      "encoder_hid_dim_type is 'image_proj'")
            encoder_hidden_states = self.encoder_hid_proj(image_embeds)  # (B, 32, cross_dim)
        elif hid_type == "text_image_proj":
            image_embeds = self._cond(added_cond_kwargs, "image_embeds",
                                      "encoder_hid_dim_type is 'text_image_proj'")
            if encoder_hidden_states is None:
                raise ValueError("encoder_hidden_states (the text encoder states) is required when "
                                 "encoder_hid_dim_type is 'text_image_proj'")
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states, image_embeds)
        elif hid_type == "text_proj":
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)

        # 2. pre-process
        sample = self.conv_in(sample)

        # 3. down
        skips = [sample]
        for block in self.down_blocks:
            sample, block_skips = block(sample, emb, encoder_hidden_states)
            skips.extend(block_skips)
            interrupt.check()  # a Stop takes effect between blocks, not after the whole step

        # 4. mid
        sample = self.mid_block(sample, emb, encoder_hidden_states)
        interrupt.check()

        # 5. up: each block takes its len(resnets) skips from the end of the list
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            sample = block(sample, block_skips, emb, encoder_hidden_states)
            interrupt.check()

        # 6. post-process
        sample = self.conv_norm_out(sample, act=True)
        return self.conv_out(sample)
