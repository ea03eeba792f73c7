"""Multilingual CLIP text encoder of Kandinsky 2.1: XLM-RoBERTa-large + a linear map into CLIP space.

Port of diffusers 0.35.2 `pipelines/kandinsky/text_encoder.py` (`MultilingualCLIP`, `MCLIPConfig`)
and of the parts of transformers 4.57.1 `XLMRobertaModel` (models/xlm_roberta/modeling_xlm_roberta.py)
that it uses: embeddings with padding-aware position ids, a post-LayerNorm encoder (BERT style:
x = LN(x + attn(x)), x = LN(x + mlp(x))) with a padding mask, inference only.

Attribute paths equal the checkpoint keys (`transformer.encoder.layer.0.attention.self.query.weight`,
`transformer.embeddings.LayerNorm.weight` (sic, TensorFlow naming), `LinearTransformation.weight`),
so `backend.weights.load_model(MultilingualCLIP, folder)` is the identity map. The pooler
(`transformer.pooler.dense`) is part of XLMRobertaModel and of its checkpoints; MultilingualCLIP
never uses its output, so it is held for strict loading and not computed.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
from mindspore import Tensor, nn

from backend.nn import (ACTIVATIONS, Embedding, LayerNorm, Linear, Model, finfo_min, get_activation, host_param,
                        is_host, run_model, scaled_dot_product_attention)


@dataclass
class MCLIPConfig:
    """Fields of the text_encoder/config.json (XLMRobertaConfig + MCLIPConfig; defaults are transformers')."""

    vocab_size: int = 30522  # token embedding rows (250002 for XLM-R)
    hidden_size: int = 768  # width of the transformer (1024 for XLM-R large)
    num_hidden_layers: int = 12  # encoder layers
    num_attention_heads: int = 12  # heads per attention
    intermediate_size: int = 3072  # MLP hidden width
    hidden_act: str = "gelu"  # MLP activation (exact erf gelu)
    max_position_embeddings: int = 512  # position table rows; positions start after pad_token_id
    type_vocab_size: int = 2  # token type table rows (only type 0 is used)
    layer_norm_eps: float = 1e-12  # epsilon of every LayerNorm
    pad_token_id: int = 1  # padding token: its position id stays pad_token_id
    position_embedding_type: str = "absolute"  # only "absolute" (the relative variants are not ported)
    is_decoder: bool = False  # a decoder (causal mask, cross attention) is not supported
    transformerDimensions: int = 1024  # input width of LinearTransformation (= hidden_size)
    numDims: int = 768  # output width of LinearTransformation (the CLIP embedding size)

    @classmethod
    def from_dict(cls, config: dict) -> "MCLIPConfig":
        config = dict(config)
        # MCLIPConfig's constructor names; saved configs carry transformerDimensions / numDims instead.
        if "transformerDimSize" in config:
            config.setdefault("transformerDimensions", config["transformerDimSize"])
        if "imageDimSize" in config:
            config.setdefault("numDims", config["imageDimSize"])
        known = {f.name for f in fields(cls)}
        result = cls(**{k: v for k, v in config.items() if k in known and not k.startswith("_")})
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "max_position_embeddings", "type_vocab_size", "transformerDimensions", "numDims"):
            value = getattr(result, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MultilingualCLIP config: {field} must be a positive integer; got {value!r}")
        if result.hidden_size % result.num_attention_heads:
            raise ValueError(f"MultilingualCLIP config: hidden_size ({result.hidden_size}) must be divisible by "
                             f"num_attention_heads ({result.num_attention_heads})")
        if result.transformerDimensions != result.hidden_size:
            raise ValueError(f"MultilingualCLIP config: transformerDimensions ({result.transformerDimensions}) must "
                             f"equal hidden_size ({result.hidden_size}); LinearTransformation reads the encoder output")
        if result.hidden_act not in ACTIVATIONS:
            raise ValueError(f"MultilingualCLIP config: hidden_act must be one of {sorted(ACTIVATIONS)}; "
                             f"got {result.hidden_act!r}")
        if result.position_embedding_type != "absolute":
            raise ValueError(f"MultilingualCLIP config: position_embedding_type must be 'absolute'; "
                             f"got {result.position_embedding_type!r}")
        if result.is_decoder or config.get("add_cross_attention"):
            raise ValueError("MultilingualCLIP config: is_decoder / add_cross_attention are not supported")
        if not isinstance(result.pad_token_id, int) or not 0 <= result.pad_token_id < result.vocab_size:
            raise ValueError(f"MultilingualCLIP config: pad_token_id must be a token id; got {result.pad_token_id!r}")
        return result


class MCLIPOutput(NamedTuple):
    """Unpacks like diffusers' `(projected, embs)` tuple."""

    text_embeds: np.ndarray | Tensor  # (B, numDims): masked mean of the token states through LinearTransformation
    last_hidden_state: np.ndarray | Tensor  # (B, L, hidden_size): every token's state, padding included


def position_ids_from_input_ids(input_ids: np.ndarray, padding_idx: int) -> np.ndarray:
    """transformers `create_position_ids_from_input_ids`: tokens count up from padding_idx + 1,
    padding tokens keep padding_idx (fairseq's make_positions)."""
    mask = (input_ids != padding_idx).astype(np.int64)
    return np.cumsum(mask, axis=1) * mask + padding_idx


class XLMRobertaEmbeddings(nn.Cell):
    def __init__(self, config: MCLIPConfig):
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # (sic), the checkpoint key

    def construct(self, input_ids, position_ids):
        words = self.word_embeddings(input_ids)  # (B, L, C)
        token_type = self.token_type_embeddings.weight  # token_type_ids are all 0: row 0
        token_type = host_param(token_type) if is_host(words) else token_type
        return self.LayerNorm(words + token_type[:1] + self.position_embeddings(position_ids))


class XLMRobertaSelfAttention(nn.Cell):
    def __init__(self, config: MCLIPConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = Linear(config.hidden_size, config.hidden_size)
        self.key = Linear(config.hidden_size, config.hidden_size)
        self.value = Linear(config.hidden_size, config.hidden_size)

    def construct(self, hidden_states, attention_mask):
        b, n, c = hidden_states.shape  # (B, L, C)
        q, k, v = (proj(hidden_states).reshape(b, n, self.num_heads, self.head_dim).swapaxes(1, 2)
                   for proj in (self.query, self.key, self.value))  # (B, h, L, d)
        out = scaled_dot_product_attention(q, k, v, attention_mask)  # (B, h, L, d)
        return out.swapaxes(1, 2).reshape(b, n, c)


class XLMRobertaSelfOutput(nn.Cell):
    """dense, then LayerNorm of the residual sum (post-norm)."""

    def __init__(self, config: MCLIPConfig, in_features: int | None = None):
        super().__init__()
        self.dense = Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)


class XLMRobertaAttention(nn.Cell):
    def __init__(self, config: MCLIPConfig):
        super().__init__()
        self.self = XLMRobertaSelfAttention(config)  # checkpoint key `attention.self.query...`
        self.output = XLMRobertaSelfOutput(config)

    def construct(self, hidden_states, attention_mask):
        return self.output(self.self(hidden_states, attention_mask), hidden_states)


class XLMRobertaIntermediate(nn.Cell):
    def __init__(self, config: MCLIPConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = get_activation(config.hidden_act)

    def construct(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class XLMRobertaOutput(XLMRobertaSelfOutput):
    """The same after the feed-forward: dense from the intermediate width."""

    def __init__(self, config: MCLIPConfig):
        super().__init__(config, config.intermediate_size)


class XLMRobertaLayer(nn.Cell):
    def __init__(self, config: MCLIPConfig):
        super().__init__()
        self.attention = XLMRobertaAttention(config)
        self.intermediate = XLMRobertaIntermediate(config)
        self.output = XLMRobertaOutput(config)

    def construct(self, hidden_states, attention_mask):
        attention_output = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class XLMRobertaEncoder(nn.Cell):
    def __init__(self, config: MCLIPConfig):
        super().__init__()
        self.layer = nn.CellList([XLMRobertaLayer(config) for _ in range(config.num_hidden_layers)])

    def construct(self, hidden_states, attention_mask):
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask)
        return hidden_states


class XLMRobertaPooler(nn.Cell):
    """dense + tanh on the first token; its weights are in every XLMRobertaModel checkpoint."""

    def __init__(self, config: MCLIPConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)


class XLMRobertaModel(nn.Cell):
    """transformers `XLMRobertaModel` (encoder only) returning the last hidden state."""

    def __init__(self, config: MCLIPConfig):
        super().__init__()
        self.config = config
        self.embeddings = XLMRobertaEmbeddings(config)
        self.encoder = XLMRobertaEncoder(config)
        self.pooler = XLMRobertaPooler(config)

    def construct(self, input_ids, position_ids, attention_mask):
        """input_ids, position_ids (B, L); attention_mask additive (B, 1, 1, L) -> (B, L, hidden_size)."""
        return self.encoder(self.embeddings(input_ids, position_ids), attention_mask)


class MultilingualCLIP(Model):
    """diffusers `MultilingualCLIP`: (input_ids, attention_mask) -> (text_embeds, last_hidden_state)."""

    def __init__(self, config: MCLIPConfig):
        super().__init__()
        self.config = config
        self.transformer = XLMRobertaModel(config)
        self.LinearTransformation = Linear(config.transformerDimensions, config.numDims)

    @classmethod
    def from_config(cls, config: dict) -> "MultilingualCLIP":
        return cls(MCLIPConfig.from_dict(config))

    def construct(self, input_ids, attention_mask=None) -> MCLIPOutput:
        """input_ids (B, L) int; attention_mask (B, L), 1 = token, 0 = padding (all ones if None)
        (backend/nn/entry.py run_model: numpy outputs on the host path)."""
        ids = np.asarray(input_ids)
        ids = ids.reshape(-1, ids.shape[-1])  # (B, L)
        keep = np.ones(ids.shape, np.float32) if attention_mask is None else \
            np.asarray(attention_mask).reshape(ids.shape).astype(np.float32)
        positions = position_ids_from_input_ids(ids, self.config.pad_token_id)
        if int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {ids.shape[1]} tokens; this text encoder takes at most "
                             f"{self.config.max_position_embeddings - self.config.pad_token_id - 1}")
        # Additive key mask (B, 1, 1, L) as transformers' get_extended_attention_mask builds it:
        # 0 for tokens, torch.finfo(dtype).min for padding, dtype the one this path computes in.
        key_mask = ((np.float32(1.0) - keep) * finfo_min(self.compute_dtype))[:, None, None, :]
        # Few tokens against large weights: each product is split over the cores (a core reads part of
        # the weights), not the samples (every core would read all of them).
        text_embeds, last_hidden_state = run_model(self, self._forward, ids, positions, key_mask, keep,
                                                   split_samples=False)
        return MCLIPOutput(text_embeds=text_embeds, last_hidden_state=last_hidden_state)

    def _forward(self, input_ids, position_ids, attention_mask, keep):
        embs = self.transformer(input_ids, position_ids, attention_mask)  # (B, L, C)
        # the mean over the tokens the mask keeps, as diffusers: (embs * mask[..., None]).sum(1) / mask.sum(1)[:, None]
        pooled = (embs * keep[:, :, None]).sum(axis=1) / keep.sum(axis=1)[:, None]
        return self.LinearTransformation(pooled), embs
