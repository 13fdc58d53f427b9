"""BERT-family encoders in flax nnx: BERT, RoBERTa and XLM-RoBERTa (embedding models).

Post-norm transformer layers with bidirectional attention: every token of an input attends to
the whole input, so an input must arrive in one step (the runner refuses chunked prefill for
these models, see ``tpu_plugin/runner/pooling.py``), and its keys and values are the step's
own: attention reads them directly (``layers.attention.encoder_attention``), and the KV pages
vLLM allocates for the requests stay untouched.

RoBERTa and XLM-RoBERTa differ from BERT only in their positions: they start at
``pad_token_id + 1`` (Hugging Face derives them from the non-padding tokens; an input here
holds no padding). Token types are all 0 (single-text embeddings).

Parameter names mirror Hugging Face's ``BertModel`` (``embeddings.word_embeddings.weight``,
``encoder.layer.3.attention.self.query.weight``), so weights load by name; checkpoints saved
with a ``bert.`` / ``roberta.`` prefix load too (the loader strips it). The ``pooler`` (dense
+ tanh on the first token) is not part of the embedding path and is not loaded.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from tpu_plugin.layers.attention import AttentionMetadata, KVCache, encoder_attention
from tpu_plugin.layers.linear import Embedding, FusedLinear, Fusion, Linear
from tpu_plugin.layers.mlp import activation
from tpu_plugin.layers.norm import LayerNorm


def _check_config(cfg: Any) -> None:
    """Fails at start-up for the encoder variants this port does not implement."""
    kind = getattr(cfg, "position_embedding_type", "absolute") or "absolute"
    if kind != "absolute":
        raise ValueError(
            f"position_embedding_type {kind!r} is not supported by the BERT port (absolute "
            "only); use a checkpoint with absolute position embeddings"
        )
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError("the BERT port runs encoders only; this config is a decoder")


class BertEmbeddings(nnx.Module):
    """Word + position + token-type (0) embeddings, then LayerNorm."""

    def __init__(self, cfg: Any, dtype: jnp.dtype):
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size, dtype)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def __call__(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class BertSelfAttention(nnx.Module):
    """Bidirectional attention; ``query`` / ``key`` / ``value`` (with bias) run as one matmul,
    ``qkv_proj``, grouped by head like the decoders' (the loader fuses the three checkpoint
    tensors, :class:`tpu_plugin.layers.linear.Fusion`)."""

    def __init__(self, cfg: Any, dtype: jnp.dtype):
        hidden = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = hidden // cfg.num_attention_heads
        parts = (("query", hidden), ("key", hidden), ("value", hidden))
        fusion = Fusion(parts, groups=self.num_heads)  # per head: its q, k and v rows
        self.qkv_proj = FusedLinear(hidden, fusion, dtype, bias=True)

    def __call__(
        self, x: jax.Array, kv_cache: KVCache, md: AttentionMetadata
    ) -> tuple[jax.Array, KVCache]:
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = (part.reshape(shape) for part in self.qkv_proj.parts(x))
        out, kv_cache = encoder_attention(q, k, v, kv_cache, md, sm_scale=self.head_dim**-0.5)
        return out.reshape(x.shape[0], -1), kv_cache


class BertDenseNorm(nnx.Module):
    """``LayerNorm(dense(x) + residual)``: HF's ``BertSelfOutput`` and ``BertOutput``."""

    def __init__(self, in_features: int, cfg: Any, dtype: jnp.dtype):
        self.dense = Linear(in_features, cfg.hidden_size, dtype, bias=True)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nnx.Module):
    def __init__(self, cfg: Any, dtype: jnp.dtype):
        # ``self`` is Hugging Face's module name (``attention.self.query``).
        self.self = BertSelfAttention(cfg, dtype)
        self.output = BertDenseNorm(cfg.hidden_size, cfg, dtype)

    def __call__(
        self, x: jax.Array, kv_cache: KVCache, md: AttentionMetadata
    ) -> tuple[jax.Array, KVCache]:
        attended, kv_cache = self.self(x, kv_cache, md)
        return self.output(attended, x), kv_cache


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: Any, dtype: jnp.dtype):
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size, dtype, bias=True)
        activation(cfg.hidden_act)  # an unknown activation fails at start-up
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return activation(self.act)(self.dense(x))


class BertLayer(nnx.Module):
    def __init__(self, cfg: Any, dtype: jnp.dtype):
        self.attention = BertAttention(cfg, dtype)
        self.intermediate = BertIntermediate(cfg, dtype)
        self.output = BertDenseNorm(cfg.intermediate_size, cfg, dtype)

    def __call__(
        self, x: jax.Array, kv_cache: KVCache, md: AttentionMetadata
    ) -> tuple[jax.Array, KVCache]:
        x, kv_cache = self.attention(x, kv_cache, md)
        return self.output(self.intermediate(x), x), kv_cache


class BertEncoder(nnx.Module):
    def __init__(self, cfg: Any, dtype: jnp.dtype):
        self.layer = nnx.List([BertLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])


class BertModel(nnx.Module):
    """``BertModel`` without its pooler: the runner calls :meth:`__call__` for hidden states."""

    # Attends both ways: the runner keeps each input in one step (pooling.py).
    bidirectional: ClassVar[bool] = True
    # RoBERTa-style positions start after the padding index.
    position_offset: ClassVar[bool] = False

    def __init__(self, cfg: Any, dtype: jnp.dtype):
        _check_config(cfg)
        self.embeddings = BertEmbeddings(cfg, dtype)
        self.encoder = BertEncoder(cfg, dtype)
        self.first_position = self.first_position_of(cfg)

    @classmethod
    def first_position_of(cls, cfg: Any) -> int:
        return int(cfg.pad_token_id) + 1 if cls.position_offset else 0

    @classmethod
    def max_input_len(cls, cfg: Any) -> int:
        """The longest input the position table holds (the runner checks ``max_model_len``)."""
        return int(cfg.max_position_embeddings) - cls.first_position_of(cfg)

    @classmethod
    def kv_cache_layout(cls, cfg: Any) -> tuple[int, int, bool]:
        """Multi-head attention: as many KV heads as query heads, ``hidden / heads`` wide."""
        return cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads, False

    @classmethod
    def fused_checkpoint_tensors(cls, cfg: Any) -> dict[str, list[tuple[str, int]]]:
        return {}

    def __call__(
        self,
        kv_caches: list[KVCache],
        input_ids: jax.Array,
        positions: jax.Array,
        md: AttentionMetadata,
    ) -> tuple[list[KVCache], jax.Array]:
        x = self.embeddings(input_ids, positions + self.first_position)
        new_caches = []
        for layer, kv_cache in zip(self.encoder.layer, kv_caches, strict=True):
            x, kv_cache = layer(x, kv_cache, md)
            new_caches.append(kv_cache)
        return new_caches, x


class RobertaModel(BertModel):
    """RoBERTa and XLM-RoBERTa: BERT with positions from ``pad_token_id + 1``."""

    position_offset: ClassVar[bool] = True
