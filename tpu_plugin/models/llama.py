"""The Llama family in flax nnx: Llama 2/3.x, SmolLM2 (tied embeddings), Qwen2/2.5 (q/k/v bias).

Module and parameter names mirror the Hugging Face checkpoint (``model.layers.3.self_attn.q_proj
.weight``), so weights load by name with no mapping table. Layers are separate modules, not a
``lax.scan`` over stacked weights: on GPU the scan measured 2.4x slower at batch 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tpu_plugin.layers.attention import AttentionMetadata, KVCache, paged_attention
from tpu_plugin.layers.linear import Embedding, Linear
from tpu_plugin.layers.norm import RMSNorm
from tpu_plugin.layers.rope import apply_rope, rope_frequencies


def head_dim_of(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: Any, dtype: jnp.dtype):
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim_of(cfg)
        # Qwen2 has q/k/v biases and no o_proj bias; Llama's attention_bias covers all four.
        qkv_bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
        o_bias = bool(getattr(cfg, "attention_bias", False))
        hidden = cfg.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, dtype, bias=qkv_bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, dtype, bias=qkv_bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, dtype, bias=qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, dtype, bias=o_bias)
        inv_freq, self.rope_scaling = rope_frequencies(cfg, self.head_dim)
        # A constant of the architecture, not a weight: kept static (hashable) on the module.
        self.inv_freq = tuple(float(f) for f in inv_freq)
        self.sm_scale = self.head_dim**-0.5

    def __call__(
        self, x: jax.Array, positions: jax.Array, kv_cache: KVCache, md: AttentionMetadata
    ) -> tuple[jax.Array, KVCache]:
        tokens = x.shape[0]
        q = self.q_proj(x).reshape(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(tokens, self.num_kv_heads, self.head_dim)
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        q = apply_rope(q, positions, inv_freq, self.rope_scaling)
        k = apply_rope(k, positions, inv_freq, self.rope_scaling)
        out, kv_cache = paged_attention(q, k, v, kv_cache, md, sm_scale=self.sm_scale)
        return self.o_proj(out.reshape(tokens, -1)), kv_cache


class GatedMLP(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, dtype: jnp.dtype, bias: bool = False):
        self.gate_proj = Linear(hidden, intermediate, dtype, bias=bias)
        self.up_proj = Linear(hidden, intermediate, dtype, bias=bias)
        self.down_proj = Linear(intermediate, hidden, dtype, bias=bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: Any, dtype: jnp.dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        mlp_bias = bool(getattr(cfg, "mlp_bias", False))
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype, bias=mlp_bias)

    def __call__(
        self, x: jax.Array, positions: jax.Array, kv_cache: KVCache, md: AttentionMetadata
    ) -> tuple[jax.Array, KVCache]:
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, md)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_cache


class LlamaModel(nnx.Module):
    def __init__(self, cfg: Any, dtype: jnp.dtype):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nnx.List(
            [LlamaDecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class LlamaForCausalLM(nnx.Module):
    """Entry point of the family; the runner calls :meth:`__call__` and :meth:`compute_logits`."""

    def __init__(self, cfg: Any, dtype: jnp.dtype):
        self.model = LlamaModel(cfg, dtype)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype)

    def __call__(
        self,
        kv_caches: list[KVCache],
        input_ids: jax.Array,
        positions: jax.Array,
        md: AttentionMetadata,
    ) -> tuple[list[KVCache], jax.Array]:
        x = self.model.embed_tokens(input_ids)
        new_caches = []
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, kv_cache = layer(x, positions, kv_cache, md)
            new_caches.append(kv_cache)
        return new_caches, self.model.norm(x)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``[rows, vocab]`` for the selected hidden states."""
        if self.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden).astype(jnp.float32)
