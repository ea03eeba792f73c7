"""The unCLIP prior: predicts a CLIP image embedding from a CLIP text embedding.

Port of diffusers 0.35.2 `PriorTransformer`
(diffusers/models/transformers/prior_transformer.py) together with the pieces of
models/attention.py (`BasicTransformerBlock`, `FeedForward`) and attention_processor.py
(`Attention` + `AttnProcessor2_0`) that it uses; `GELU`, `TimestepEmbedding` and the `Timesteps`
embedding come from backend/nn. Attribute paths equal the diffusers
checkpoint keys (`transformer_blocks.0.attn1.to_q.weight`, `clip_mean`, ...), so
`backend.weights.load_model(PriorTransformer, folder)` is the identity map.

The token sequence the transformer sees is, in order:
    [text tokens (encoder_hidden_states) ..., proj_embedding, time embedding, hidden_states, prd]
and the prediction is read from the last (`prd`) token.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from mindspore import Tensor, nn

from backend.nn import (ACTIVATIONS, GELU, Identity, LayerNorm, Linear, Model, TimestepEmbedding, concat,
                        get_timestep_embedding, host_param, is_host, run_model, scaled_dot_product_attention,
                        zeros_parameter)


@dataclass
class PriorTransformerConfig:
    """Fields of diffusers' `PriorTransformer` config.json (defaults are diffusers')."""

    num_attention_heads: int = 32  # heads of every self-attention
    attention_head_dim: int = 64  # channels per head; width = heads * head_dim
    num_layers: int = 20  # transformer blocks
    embedding_dim: int = 768  # CLIP embedding size of `hidden_states` and of the text tokens
    num_embeddings: int = 77  # text tokens (the CLIP text encoder's sequence length)
    additional_embeddings: int = 4  # tokens after the text: proj, time, hidden, prd
    dropout: float = 0.0  # training only; ignored at inference
    time_embed_act_fn: str = "silu"  # activation between the two time-embedding linears
    norm_in_type: str | None = None  # None | "layer": LayerNorm before the blocks
    embedding_proj_norm_type: str | None = None  # None | "layer": LayerNorm on `proj_embedding`
    encoder_hid_proj_type: str | None = "linear"  # None | "linear": projection of the text tokens
    added_emb_type: str | None = "prd"  # None | "prd": learned last token the output is read from
    time_embed_dim: int | None = None  # hidden size of the time MLP; None = width
    embedding_proj_dim: int | None = None  # size of `proj_embedding`; None = embedding_dim
    clip_embed_dim: int | None = None  # output size; None = embedding_dim

    @classmethod
    def from_dict(cls, config: dict) -> "PriorTransformerConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known and not k.startswith("_")}
        result = cls(**values)
        result.validate()
        return result

    def validate(self) -> None:
        for name in ("num_attention_heads", "attention_head_dim", "num_layers", "embedding_dim",
                     "num_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"PriorTransformer config: {name} must be a positive integer; got {value!r}")
        if not isinstance(self.additional_embeddings, int) or self.additional_embeddings < 0:
            raise ValueError("PriorTransformer config: additional_embeddings must be an integer >= 0; "
                             f"got {self.additional_embeddings!r}")
        if self.time_embed_act_fn not in ACTIVATIONS:
            raise ValueError(f"PriorTransformer config: time_embed_act_fn must be one of {sorted(ACTIVATIONS)}; "
                             f"got {self.time_embed_act_fn!r}")
        allowed = {"norm_in_type": (None, "layer"), "embedding_proj_norm_type": (None, "layer"),
                   "encoder_hid_proj_type": (None, "linear"), "added_emb_type": (None, "prd")}
        for name, choices in allowed.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"PriorTransformer config: {name} must be one of {choices}; "
                                 f"got {getattr(self, name)!r}")


class Attention(nn.Cell):
    """diffusers `Attention` as a self-attention with biased q/k/v (AttnProcessor2_0)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = Linear(query_dim, inner_dim)
        self.to_k = Linear(query_dim, inner_dim)
        self.to_v = Linear(query_dim, inner_dim)
        # to_out.1 is a Dropout in diffusers; an identity at inference keeps the key "to_out.0".
        self.to_out = nn.CellList([Linear(inner_dim, query_dim), Identity()])

    def construct(self, hidden_states, attention_mask=None):
        b, n, _ = hidden_states.shape  # (B, N, C)
        q, k, v = (proj(hidden_states).reshape(b, n, self.heads, self.dim_head).swapaxes(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))  # (B, h, N, d)
        out = scaled_dot_product_attention(q, k, v, attention_mask)  # mask (B, 1, N, N) additive
        return self.to_out[0](out.swapaxes(1, 2).reshape(b, n, self.heads * self.dim_head))


class FeedForward(nn.Cell):
    """diffusers `FeedForward` with activation_fn="gelu", mult 4: net.0 (GELU proj), net.1 (dropout), net.2."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = int(dim * mult)
        self.net = nn.CellList([GELU(dim, inner_dim), Identity(), Linear(inner_dim, dim)])

    def construct(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Cell):
    """diffusers `BasicTransformerBlock`, norm_type "layer_norm", no cross-attention (attn2/norm2 absent)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, num_attention_heads, attention_head_dim)
        self.norm3 = LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def construct(self, hidden_states, attention_mask=None):
        hidden_states = self.attn1(self.norm1(hidden_states), attention_mask) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class PriorTransformer(Model):
    """diffusers `PriorTransformer` (inference)."""

    def __init__(self, config: PriorTransformerConfig):
        super().__init__()
        config.validate()
        self.config = config
        inner_dim = config.num_attention_heads * config.attention_head_dim
        self.inner_dim = inner_dim
        self.additional_embeddings = config.additional_embeddings
        time_embed_dim = config.time_embed_dim or inner_dim
        embedding_proj_dim = config.embedding_proj_dim or config.embedding_dim
        clip_embed_dim = config.clip_embed_dim or config.embedding_dim

        # `time_proj` (diffusers `Timesteps(inner_dim, flip_sin_to_cos=True, shift=0)`) has no weights:
        # construct calls get_timestep_embedding.
        self.time_embedding = TimestepEmbedding(inner_dim, time_embed_dim, config.time_embed_act_fn,
                                                out_dim=inner_dim)
        self.proj_in = Linear(config.embedding_dim, inner_dim)
        self.embedding_proj_norm = (LayerNorm(embedding_proj_dim)
                                    if config.embedding_proj_norm_type == "layer" else None)
        self.embedding_proj = Linear(embedding_proj_dim, inner_dim)
        self.encoder_hidden_states_proj = (Linear(config.embedding_dim, inner_dim)
                                           if config.encoder_hid_proj_type == "linear" else None)
        seq_len = config.num_embeddings + config.additional_embeddings
        self.positional_embedding = zeros_parameter((1, seq_len, inner_dim))
        self.prd_embedding = zeros_parameter((1, 1, inner_dim)) if config.added_emb_type == "prd" else None
        self.transformer_blocks = nn.CellList([
            BasicTransformerBlock(inner_dim, config.num_attention_heads, config.attention_head_dim)
            for _ in range(config.num_layers)
        ])
        self.norm_in = LayerNorm(inner_dim) if config.norm_in_type == "layer" else None
        self.norm_out = LayerNorm(inner_dim)
        self.proj_to_clip_embeddings = Linear(inner_dim, clip_embed_dim)
        # A buffer in diffusers (not in the checkpoint): -10000 above the diagonal.
        self.causal_attention_mask = np.triu(np.full((seq_len, seq_len), -10000.0, np.float32), 1)[None]
        # Statistics of the CLIP image embeddings the prior was trained on (un-normalise its output).
        self.clip_mean = zeros_parameter((1, clip_embed_dim))
        self.clip_std = zeros_parameter((1, clip_embed_dim))

    @classmethod
    def from_config(cls, config: dict) -> "PriorTransformer":
        return cls(PriorTransformerConfig.from_dict(config))

    @staticmethod
    def _timesteps(timestep, batch_size: int) -> np.ndarray:
        """(B,) timesteps, broadcast as diffusers does (a Python number becomes a long)."""
        if isinstance(timestep, (Tensor, np.ndarray)):  # an array is taken like a tensor
            values = np.asarray(timestep)
        else:
            values = np.array([int(timestep)], dtype=np.int64)  # torch.tensor([t], dtype=torch.long)
        values = values.reshape(-1)
        if values.shape[0] not in (1, batch_size):
            raise ValueError(f"timestep must hold 1 or batch_size={batch_size} values; got {values.shape[0]}")
        return np.broadcast_to(values, (batch_size,))

    def _text_mask(self, attention_mask: np.ndarray) -> np.ndarray:
        """(B, T) text mask, 1 = keep -> additive (B, 1, N, N) float32 mask with the causal mask, as
        diffusers builds it (the causal mask applies only together with a text mask)."""
        text_mask = (1 - attention_mask.astype(np.float32)) * np.float32(-10000.0)  # (B, T)
        text_mask = np.pad(text_mask, ((0, 0), (0, self.additional_embeddings)))  # (B, N)
        return (text_mask[:, None, :] + self.causal_attention_mask)[:, None]  # (B, 1, N, N)

    def construct(self, hidden_states, timestep, proj_embedding, encoder_hidden_states=None,
                  attention_mask=None):
        """hidden_states (B, embedding_dim) noisy image embedding; timestep int | (B,) | ();
        proj_embedding (B, embedding_proj_dim) pooled text embedding; encoder_hidden_states
        (B, num_embeddings, embedding_dim) text tokens; attention_mask (B, num_embeddings) 1 = keep.
        Returns the predicted image embedding (B, clip_embed_dim) (backend/nn/entry.py run_model:
        numpy on the host path)."""
        if self.encoder_hidden_states_proj is not None and encoder_hidden_states is None:
            raise ValueError("`encoder_hidden_states_proj` requires `encoder_hidden_states` to be set")
        batch_size = hidden_states.shape[0]
        timesteps_projected = get_timestep_embedding(self._timesteps(timestep, batch_size), self.inner_dim,
                                                     flip_sin_to_cos=True, downscale_freq_shift=0)  # time_proj
        mask = None if attention_mask is None else self._text_mask(np.asarray(attention_mask))
        # 81 tokens against 4 GB of weights (2.2): each product is split over the cores (a core reads
        # part of the weights), not the samples (every core would read all of them; measured 1.18x
        # the CPU time of a guided step).
        return run_model(self, self._forward, hidden_states, timesteps_projected, proj_embedding,
                         encoder_hidden_states, mask, split_samples=False)

    def _forward(self, hidden_states, timesteps_projected, proj_embedding, encoder_hidden_states, attention_mask):
        batch_size = hidden_states.shape[0]
        time_embeddings = self.time_embedding(timesteps_projected)  # (B, W)
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        proj_embeddings = self.embedding_proj(proj_embedding)  # (B, W)
        if self.encoder_hidden_states_proj is not None:
            encoder_hidden_states = self.encoder_hidden_states_proj(encoder_hidden_states)  # (B, T, W)
        hidden_states = self.proj_in(hidden_states)

        # The token sequence: [text tokens ..., proj_embedding, time embedding, hidden_states, prd]
        tokens = [] if encoder_hidden_states is None else [encoder_hidden_states]
        if proj_embeddings.ndim == 2:
            proj_embeddings = proj_embeddings[:, None, :]
        if hidden_states.ndim == 2:
            hidden_states = hidden_states[:, None, :]
        tokens += [proj_embeddings, time_embeddings[:, None, :], hidden_states]
        additional_embeddings_len = sum(t.shape[1] for t in tokens[:-1])  # the tokens before hidden_states
        host = is_host(hidden_states)
        if self.prd_embedding is not None:
            prd_embedding = host_param(self.prd_embedding) if host else self.prd_embedding
            tokens.append(concat([prd_embedding] * batch_size, axis=0))  # (B, 1, W)
        hidden_states = concat(tokens, axis=1)  # (B, N, W)
        positional_embeddings = host_param(self.positional_embedding) if host else self.positional_embedding
        if positional_embeddings.shape[1] != hidden_states.shape[1]:
            # diffusers pads a shorter table with zeros, which fits only a one-row table: any other
            # length fails there in the addition below.
            raise ValueError(f"the prior's token sequence has {hidden_states.shape[1]} tokens; its "
                             f"positional_embedding has {positional_embeddings.shape[1]} (num_embeddings "
                             f"{self.config.num_embeddings} + additional_embeddings {self.additional_embeddings})")
        hidden_states = hidden_states + positional_embeddings

        if self.norm_in is not None:
            hidden_states = self.norm_in(hidden_states)
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, attention_mask)
        hidden_states = self.norm_out(hidden_states)

        if self.prd_embedding is not None:
            hidden_states = hidden_states[:, -1]  # (B, W)
        else:
            hidden_states = hidden_states[:, additional_embeddings_len:]
        return self.proj_to_clip_embeddings(hidden_states)

    def post_process_latents(self, prior_latents):
        """Un-normalise a predicted embedding: latents * clip_std + clip_mean."""
        return run_model(self, self._post_process, prior_latents, split_samples=False)

    def _post_process(self, latents):
        std, mean = self.clip_std, self.clip_mean
        if is_host(latents):
            std, mean = host_param(std), host_param(mean)
        return latents * std + mean
