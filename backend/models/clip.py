"""CLIP text and vision towers with their projections (the Kandinsky 2.x prior's encoders).

Port of transformers 4.57.1 `CLIPTextModelWithProjection` and `CLIPVisionModelWithProjection`
(transformers/models/clip/modeling_clip.py), inference only. Attribute paths equal the
transformers checkpoint keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`,
`vision_model.pre_layrnorm.weight` (sic), `visual_projection.weight`, ...), so
`backend.weights.load_model(CLIPTextModelWithProjection, folder)` is the identity map. The
`position_ids` buffers of older checkpoints are skipped by weights.py.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
from mindspore import Tensor, nn

from backend.nn import (ACTIVATIONS, Conv2d, Embedding, LayerNorm, Linear, Model, concat, finfo_min, get_activation,
                        host_param, is_host, run_model, scaled_dot_product_attention, zeros_parameter)


def _fields_from(cls, config: dict, sub_key: str):
    # A full CLIPConfig (model_type "clip") nests the tower's fields, as transformers' from_pretrained reads them.
    if config.get("model_type") == "clip" and isinstance(config.get(sub_key), dict):
        config = config[sub_key]
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in known and not k.startswith("_")})


def _check_common(config, name: str) -> None:
    for field in ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads"):
        value = getattr(config, field)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} config: {field} must be a positive integer; got {value!r}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"{name} config: hidden_size ({config.hidden_size}) must be divisible by "
                         f"num_attention_heads ({config.num_attention_heads})")
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{name} config: hidden_act must be one of {sorted(ACTIVATIONS)}; got {config.hidden_act!r}")


@dataclass
class CLIPTextConfig:
    """Fields of transformers' `CLIPTextConfig` config.json (defaults are transformers')."""

    vocab_size: int = 49408  # token embedding rows
    hidden_size: int = 512  # width of the transformer
    intermediate_size: int = 2048  # MLP hidden width
    projection_dim: int = 512  # size of `text_embeds`
    num_hidden_layers: int = 12  # encoder layers
    num_attention_heads: int = 8  # heads per attention
    max_position_embeddings: int = 77  # longest token sequence
    hidden_act: str = "quick_gelu"  # "gelu" (ViT-bigG, 2.2) or "quick_gelu" (OpenAI ViT-L, 2.1)
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm
    eos_token_id: int = 49407  # 2 selects transformers' legacy pooling: argmax(input_ids)

    @classmethod
    def from_dict(cls, config: dict) -> "CLIPTextConfig":
        result = _fields_from(cls, config, "text_config")
        _check_common(result, "CLIPTextModelWithProjection")
        for field in ("vocab_size", "max_position_embeddings"):
            value = getattr(result, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"CLIPTextModelWithProjection config: {field} must be a positive integer; "
                                 f"got {value!r}")
        return result


@dataclass
class CLIPVisionConfig:
    """Fields of transformers' `CLIPVisionConfig` config.json (defaults are transformers')."""

    hidden_size: int = 768  # width of the transformer
    intermediate_size: int = 3072  # MLP hidden width
    projection_dim: int = 512  # size of `image_embeds`
    num_hidden_layers: int = 12  # encoder layers
    num_attention_heads: int = 12  # heads per attention
    num_channels: int = 3  # input image channels
    image_size: int = 224  # input height = width
    patch_size: int = 32  # side of one patch (conv kernel = stride)
    hidden_act: str = "quick_gelu"  # "gelu" (ViT-bigG, 2.2) or "quick_gelu" (OpenAI ViT-L, 2.1)
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm

    @classmethod
    def from_dict(cls, config: dict) -> "CLIPVisionConfig":
        result = _fields_from(cls, config, "vision_config")
        _check_common(result, "CLIPVisionModelWithProjection")
        for field in ("num_channels", "image_size", "patch_size"):
            value = getattr(result, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"CLIPVisionModelWithProjection config: {field} must be a positive integer; "
                                 f"got {value!r}")
        return result


class CLIPTextModelOutput(NamedTuple):
    text_embeds: np.ndarray | Tensor  # (B, projection_dim)
    last_hidden_state: np.ndarray | Tensor  # (B, L, hidden_size), after final_layer_norm


class CLIPVisionModelOutput(NamedTuple):
    image_embeds: np.ndarray | Tensor  # (B, projection_dim)
    last_hidden_state: np.ndarray | Tensor  # (B, 1 + patches, hidden_size), before post_layernorm


class CLIPAttention(nn.Cell):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim ** -0.5
        self.k_proj = Linear(hidden_size, hidden_size)
        self.v_proj = Linear(hidden_size, hidden_size)
        self.q_proj = Linear(hidden_size, hidden_size)
        self.out_proj = Linear(hidden_size, hidden_size)

    def construct(self, hidden_states, attention_mask=None):
        b, n, c = hidden_states.shape  # (B, L, C)
        q, k, v = (proj(hidden_states).reshape(b, n, self.num_heads, self.head_dim).swapaxes(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, h, L, d)
        out = scaled_dot_product_attention(q, k, v, attention_mask, scale=self.scale)  # (B, h, L, d)
        return self.out_proj(out.swapaxes(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Cell):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.activation_fn = get_activation(hidden_act)
        self.fc1 = Linear(hidden_size, intermediate_size)
        self.fc2 = Linear(intermediate_size, hidden_size)

    def construct(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, hidden_states, attention_mask=None):
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), attention_mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def construct(self, hidden_states, attention_mask=None):
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
        return hidden_states


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size)

    def construct(self, input_ids):
        embeddings = self.token_embedding(input_ids)  # (B, L, C)
        positions = self.position_embedding.weight  # position_ids = arange(L): the first L rows
        positions = host_param(positions) if is_host(embeddings) else positions
        return embeddings + positions[:input_ids.shape[-1]]


class CLIPTextTransformer(nn.Cell):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.eos_token_id = config.eos_token_id

    @staticmethod
    def attention_mask_4d(attention_mask: np.ndarray | None, batch: int, length: int, min_value: float) -> np.ndarray:
        """Causal mask plus the padding mask, (B, 1, L, L) additive float32, as transformers builds
        them with min_value = torch.finfo(dtype).min."""
        min_value = np.float32(min_value)
        causal = np.triu(np.full((length, length), min_value, np.float32), 1)  # 0 on/below the diagonal
        mask = np.broadcast_to(causal, (batch, 1, length, length))
        if attention_mask is not None:
            padding = np.where(attention_mask.astype(bool), np.float32(0.0), min_value).astype(np.float32)
            with np.errstate(over="ignore"):  # min + min = -inf in float32, exactly as in torch
                mask = mask + padding[:, None, None, :]
        return np.ascontiguousarray(mask, dtype=np.float32)

    def pooled_positions(self, ids: np.ndarray) -> list[int]:
        """Index of the end-of-text token in each row, chosen as transformers 4.57.1 does."""
        if self.eos_token_id == 2:
            # Legacy configs (eos_token_id left at 2): the EOT token has the highest id in CLIP's vocab.
            return ids.astype(np.int32).argmax(axis=-1).tolist()
        # First occurrence of eos_token_id (the pad token may equal it); 0 when a row has none.
        return (ids.astype(np.int32) == self.eos_token_id).astype(np.int32).argmax(axis=-1).tolist()

    def construct(self, input_ids, attention_mask, pooled_positions: list[int]):
        """input_ids (B, L), additive attention_mask (B, 1, L, L), pooled_positions (B numbers)
        -> last_hidden_state (B, L, C), pooled (B, C)."""
        hidden_states = self.encoder(self.embeddings(input_ids), attention_mask)
        last_hidden_state = self.final_layer_norm(hidden_states)
        pooled = last_hidden_state[list(range(len(pooled_positions))), pooled_positions]
        return last_hidden_state, pooled


class CLIPTextModelWithProjection(Model):
    """transformers `CLIPTextModelWithProjection`: returns text_embeds and last_hidden_state."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False)

    @classmethod
    def from_config(cls, config: dict) -> "CLIPTextModelWithProjection":
        return cls(CLIPTextConfig.from_dict(config))

    def construct(self, input_ids, attention_mask=None) -> CLIPTextModelOutput:
        """input_ids (B, L) int; attention_mask (B, L) with 1 = token, 0 = padding (optional)
        (backend/nn/entry.py run_model: numpy outputs on the host path)."""
        ids = np.asarray(input_ids)
        ids = ids.reshape(-1, ids.shape[-1])  # (B, L)
        batch, length = ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens; this text encoder takes at most "
                             f"{self.config.max_position_embeddings}")
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask).reshape(batch, length)
        mask = self.text_model.attention_mask_4d(attention_mask, batch, length, finfo_min(self.compute_dtype))
        positions = self.text_model.pooled_positions(ids)
        # Few tokens against large weights: each product is split over the cores (a core reads part of
        # the weights), not the samples (every core would read all of them).
        text_embeds, last_hidden_state = run_model(self, self._forward, ids, mask, positions, split_samples=False)
        return CLIPTextModelOutput(text_embeds=text_embeds, last_hidden_state=last_hidden_state)

    def _forward(self, input_ids, attention_mask, pooled_positions):
        last_hidden_state, pooled = self.text_model(input_ids, attention_mask, pooled_positions)
        return self.text_projection(pooled), last_hidden_state


class CLIPVisionEmbeddings(nn.Cell):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.embed_dim = config.hidden_size
        self.class_embedding = zeros_parameter((config.hidden_size,))
        self.patch_embedding = Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                      stride=config.patch_size, bias=False)
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = Embedding(num_positions, config.hidden_size)

    def construct(self, pixel_values):
        batch, _, height, width = pixel_values.shape
        if height != self.image_size or width != self.image_size:
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model "
                             f"({self.image_size}*{self.image_size}).")
        patches = self.patch_embedding(pixel_values)  # (B, C, g, g)
        patches = patches.reshape(batch, self.embed_dim, -1).swapaxes(1, 2)  # (B, g*g, C)
        cls, positions = self.class_embedding, self.position_embedding.weight  # position_ids = arange
        if is_host(patches):
            cls, positions = host_param(cls), host_param(positions)
        embeddings = concat([concat([cls.reshape(1, 1, -1)] * batch, axis=0), patches], axis=1)  # (B, 1 + g*g, C)
        return embeddings + positions


class CLIPVisionTransformer(nn.Cell):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # (sic), the checkpoint key
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, pixel_values):
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values))
        last_hidden_state = self.encoder(hidden_states)
        pooled = self.post_layernorm(last_hidden_state[:, 0, :])  # class token
        return last_hidden_state, pooled


class CLIPVisionModelWithProjection(Model):
    """transformers `CLIPVisionModelWithProjection`: returns image_embeds and last_hidden_state."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = Linear(config.hidden_size, config.projection_dim, bias=False)

    @classmethod
    def from_config(cls, config: dict) -> "CLIPVisionModelWithProjection":
        return cls(CLIPVisionConfig.from_dict(config))

    def construct(self, pixel_values) -> CLIPVisionModelOutput:
        """pixel_values (B, num_channels, image_size, image_size), as CLIPImageProcessor makes them
        (backend/nn/entry.py run_model: numpy outputs on the host path)."""
        # split_samples=False: as for the text tower (CLIPTextModelWithProjection.construct)
        image_embeds, last_hidden_state = run_model(self, self._forward, pixel_values, split_samples=False)
        return CLIPVisionModelOutput(image_embeds=image_embeds, last_hidden_state=last_hidden_state)

    def _forward(self, pixel_values):
        last_hidden_state, pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled), last_hidden_state
