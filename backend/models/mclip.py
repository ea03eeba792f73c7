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

Two execution paths, as in clip.py: on CPU numpy arrays from the embeddings to the outputs
(products through backend/nn/host.py's oneDNN sgemm), on GPU/Ascend mindspore.ops Tensors.
`cpu_numpy_path = False` on a model runs the mindspore.ops path on CPU too (the tests check both).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from backend.device import on_cpu
from backend.nn.layers import Embedding, LayerNorm, Linear, gelu, is_host, scaled_dot_product_attention

# transformers ACT2FN names this port supports.
_ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": lambda x: gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: gelu(x, approximate="tanh"),
}


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
        if result.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"MultilingualCLIP config: hidden_act must be one of {sorted(_ACTIVATIONS)}; "
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

    text_embeds: Tensor  # (B, numDims): masked mean of the token states through LinearTransformation
    last_hidden_state: Tensor  # (B, L, hidden_size): every token's state, padding included


def position_ids_from_input_ids(input_ids: np.ndarray, padding_idx: int) -> np.ndarray:
    """transformers `create_position_ids_from_input_ids`: tokens count up from padding_idx + 1,
    padding tokens keep padding_idx (fairseq's make_positions)."""
    mask = (input_ids != padding_idx).astype(np.int64)
    return np.cumsum(mask, axis=1) * mask + padding_idx


def _min_value(dtype) -> float:
    # torch.finfo(dtype).min, what transformers' get_extended_attention_mask puts on padding keys.
    return float(np.finfo(np.float16).min) if dtype == ms.float16 else float(np.finfo(np.float32).min)


class XLMRobertaEmbeddings(nn.Cell):
    def __init__(self, config: MCLIPConfig):
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # (sic), the checkpoint key

    def construct(self, input_ids, position_ids):
        if is_host(input_ids):
            embeddings = self.word_embeddings(input_ids)  # (B, L, C), a fresh array
            embeddings += self.token_type_embeddings(np.zeros((1,), np.int64))  # token type 0 everywhere
            embeddings += self.position_embeddings(position_ids)
            return self.LayerNorm(embeddings)
        token_type = self.token_type_embeddings.weight[:1]  # (1, C)
        embeddings = self.word_embeddings(input_ids) + token_type + self.position_embeddings(position_ids)
        return self.LayerNorm(embeddings)


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
        if is_host(hidden_states):
            # heads as strided views (B, L, h, d) -> (B, h, L, d): sgemm reads them in place
            q, k, v = (proj(hidden_states).reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
                       for proj in (self.query, self.key, self.value))
            out = scaled_dot_product_attention(q, k, v, attention_mask)  # (B, h, L, d)
            return out.transpose(0, 2, 1, 3).reshape(b, n, c)
        q, k, v = (proj(hidden_states).reshape(b, n, self.num_heads, self.head_dim).swapaxes(1, 2)
                   for proj in (self.query, self.key, self.value))
        out = scaled_dot_product_attention(q, k, v, attention_mask)
        return out.swapaxes(1, 2).reshape(b, n, c)


class XLMRobertaSelfOutput(nn.Cell):
    """dense, then LayerNorm of the residual sum (post-norm)."""

    def __init__(self, config: MCLIPConfig, in_features: int | None = None):
        super().__init__()
        self.dense = Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, hidden_states, input_tensor):
        hidden_states = self.dense(hidden_states)
        if is_host(hidden_states):
            hidden_states += input_tensor
            return self.LayerNorm(hidden_states)
        return self.LayerNorm(hidden_states + input_tensor)


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
        self.hidden_act = config.hidden_act
        self.dense = Linear(config.hidden_size, config.intermediate_size)

    def construct(self, hidden_states):
        return _ACTIVATIONS[self.hidden_act](self.dense(hidden_states))


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

    def construct(self, input_ids: np.ndarray, attention_mask: np.ndarray, dtype=None):
        """input_ids and attention_mask (B, L) numpy; dtype None runs the host path (numpy out),
        else the mindspore.ops path in that dtype (Tensor out). -> (B, L, hidden_size)."""
        batch, length = input_ids.shape
        positions = position_ids_from_input_ids(input_ids, self.config.pad_token_id)
        if int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens; this text encoder takes at most "
                             f"{self.config.max_position_embeddings - self.config.pad_token_id - 1}")
        # Additive key mask (B, 1, 1, L): 0 for tokens, finfo.min for padding, as transformers builds it.
        keep = attention_mask.astype(np.float32)
        if dtype is None:
            mask = ((np.float32(1.0) - keep) * np.float32(_min_value(ms.float32)))[:, None, None, :]
            hidden_states = self.embeddings(input_ids.astype(np.int64), positions)
            return self.encoder(hidden_states, np.ascontiguousarray(mask, dtype=np.float32))
        mask = ((1.0 - keep) * _min_value(dtype))[:, None, None, :].astype(np.float32)
        hidden_states = self.embeddings(Tensor(input_ids.astype(np.int32)), Tensor(positions.astype(np.int32)))
        return self.encoder(hidden_states, Tensor(mask).astype(dtype))


class MultilingualCLIP(nn.Cell):
    """diffusers `MultilingualCLIP`: (input_ids, attention_mask) -> (text_embeds, last_hidden_state)."""

    def __init__(self, config: MCLIPConfig):
        super().__init__()
        self.config = config
        self.transformer = XLMRobertaModel(config)
        self.LinearTransformation = Linear(config.transformerDimensions, config.numDims)

    @classmethod
    def from_config(cls, config: dict) -> "MultilingualCLIP":
        return cls(MCLIPConfig.from_dict(config))

    @property
    def dtype(self):
        return self.LinearTransformation.weight.dtype

    cpu_numpy_path = True

    def construct(self, input_ids, attention_mask=None) -> MCLIPOutput:
        """input_ids (B, L) int; attention_mask (B, L), 1 = token, 0 = padding (all ones if None)."""
        ids = input_ids.asnumpy() if isinstance(input_ids, Tensor) else np.asarray(input_ids)
        ids = ids.reshape(-1, ids.shape[-1])  # (B, L)
        if attention_mask is None:
            mask = np.ones(ids.shape, np.float32)
        else:
            mask = attention_mask.asnumpy() if isinstance(attention_mask, Tensor) else np.asarray(attention_mask)
            mask = mask.reshape(ids.shape).astype(np.float32)
        if self.cpu_numpy_path and on_cpu():
            embs = self.transformer(ids, mask)  # (B, L, C) numpy
            # mean over the tokens the mask keeps (diffusers: (embs * mask).sum(1) / mask.sum(1))
            pooled = np.einsum("blc,bl->bc", embs, mask) / mask.sum(axis=1)[:, None]
            projected = self.LinearTransformation(pooled.astype(np.float32))
            return MCLIPOutput(text_embeds=_to_tensor(projected, self.dtype),
                               last_hidden_state=_to_tensor(embs, self.dtype))
        embs = self.transformer(ids, mask, self.dtype)  # (B, L, C) Tensor
        mask_t = Tensor(mask).astype(embs.dtype)
        pooled = (embs * mask_t[:, :, None]).sum(axis=1) / mask_t.sum(axis=1)[:, None]
        return MCLIPOutput(text_embeds=self.LinearTransformation(pooled), last_hidden_state=embs)


def _to_tensor(array: np.ndarray, dtype) -> Tensor:
    """A host-path result as a Tensor of the model's dtype (float32: no copy)."""
    out = Tensor.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return out.astype(dtype) if dtype != ms.float32 else out
