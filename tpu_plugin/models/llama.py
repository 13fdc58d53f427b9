"""The Llama family in flax nnx, and the dense decoder the other families build on.

Llama 2/3.x, SmolLM2 (tied embeddings) and Qwen2/2.5 (q/k/v bias) live here; Qwen3, Mistral,
Phi-3 and Gemma 3 subclass :class:`LlamaForCausalLM` in their own files and override only the
class-level hooks (:meth:`~LlamaForCausalLM.attention_spec`,
:meth:`~LlamaForCausalLM.decoder_layer`, :meth:`~LlamaForCausalLM.embed`,
:meth:`~LlamaForCausalLM.compute_logits`, :meth:`~LlamaForCausalLM.fused_checkpoint_tensors`),
never the forward loop, so what the runner calls is the same for every family.

Module and parameter names mirror the Hugging Face checkpoint (``model.layers.3.self_attn.o_proj
.weight``), so weights load by name with no mapping table; the fused projections
(``self_attn.qkv_proj``, ``mlp.gate_up_proj``) are built by the loader from their parts' names.
Layers are separate modules, not a ``lax.scan`` over stacked weights: on GPU the scan measured
2.4x slower at batch 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from tpu_plugin.layers.attention import (
    AttentionMetadata,
    AttentionSpec,
    KVCache,
    SelfAttention,
    sliding_window_of,
)
from tpu_plugin.layers.linear import Embedding, Linear
from tpu_plugin.layers.mlp import GatedMLP
from tpu_plugin.layers.norm import RMSNorm
from tpu_plugin.layers.rope import RotaryEmbedding


def head_dim_of(cfg: Any) -> int:
    """Per-head width: explicit ``head_dim`` (Qwen3, Gemma) or ``hidden / heads``."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_type_of(cfg: Any, layer_idx: int) -> str | None:
    """``config.layer_types[layer_idx]`` where the config has per-layer types, else ``None``."""
    layer_types = getattr(cfg, "layer_types", None)
    return layer_types[layer_idx] if layer_types else None


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    The residual stream is carried beside the block's output rather than added at its end:
    ``(out, residual) -> (out', residual')``, each add done by the norm after it
    (:meth:`~tpu_plugin.layers.norm.RMSNorm.add_and_norm`, one fusion), the last one by the
    model's final norm. The sums are those HF computes, in the same dtype and order.
    """

    def __init__(self, cfg: Any, spec: AttentionSpec, dtype: jnp.dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = SelfAttention(spec, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = GatedMLP(
            cfg.hidden_size,
            cfg.intermediate_size,
            dtype,
            bias=bool(getattr(cfg, "mlp_bias", False)),
            act=getattr(cfg, "hidden_act", "silu"),
        )

    def __call__(
        self,
        x: jax.Array,
        residual: jax.Array | None,
        positions: jax.Array,
        kv_cache: KVCache,
        md: AttentionMetadata,
    ) -> tuple[jax.Array, jax.Array, KVCache]:
        h, residual = self.input_layernorm.add_and_norm(x, residual)
        attn_out, kv_cache = self.self_attn(h, positions, kv_cache, md)
        h, residual = self.post_attention_layernorm.add_and_norm(attn_out, residual)
        return self.mlp(h), residual, kv_cache


class LlamaModel(nnx.Module):
    """Embedding, the decoder layers and the final norm (HF's ``model.`` prefix)."""

    def __init__(self, cfg: Any, layers: list[nnx.Module], dtype: jnp.dtype, norm_offset: float):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nnx.List(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, weight_offset=norm_offset)


class LlamaForCausalLM(nnx.Module):
    """Entry point of the family; the runner calls :meth:`__call__` and :meth:`compute_logits`."""

    # Gemma's RMSNorm scales by (1 + weight); 0.0 is the plain ``weight`` form.
    norm_offset: ClassVar[float] = 0.0

    def __init__(self, cfg: Any, dtype: jnp.dtype):
        layers = [self.decoder_layer(cfg, i, dtype) for i in range(cfg.num_hidden_layers)]
        self.model = LlamaModel(cfg, layers, dtype, self.norm_offset)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype)

    # ---- hooks the other families override ------------------------------------------------

    @classmethod
    def attention_spec(cls, cfg: Any, layer_idx: int) -> AttentionSpec:
        """Layer ``layer_idx``'s attention; Llama's ``attention_bias`` covers all four."""
        head_dim = head_dim_of(cfg)
        bias = bool(getattr(cfg, "attention_bias", False))
        return AttentionSpec(
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            rope=RotaryEmbedding.from_config(cfg, head_dim, layer_type_of(cfg, layer_idx)),
            qkv_bias=bias,
            o_bias=bias,
            sliding_window=sliding_window_of(cfg, layer_idx),
        )

    def decoder_layer(self, cfg: Any, layer_idx: int, dtype: jnp.dtype) -> nnx.Module:
        return LlamaDecoderLayer(cfg, self.attention_spec(cfg, layer_idx), dtype)

    @classmethod
    def fused_checkpoint_tensors(cls, cfg: Any) -> dict[str, list[tuple[str, int]]]:
        """Checkpoint modules renamed, or cut on axis 0 into several of this port's modules.

        ``{"mlp.gate": [("block_sparse_moe.gate", rows)]}`` renames (a single entry);
        several entries cut ``model.layers.N.<key>.{weight,bias}`` into the parts, ``rows``
        each, in order. Fused projections need no entry: the loader finds them in the model
        (:class:`tpu_plugin.layers.linear.FusedLinear`) and takes both their parts and a
        checkpoint's concatenated fused tensor (Phi-3). Llama needs none.
        """
        return {}

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.model.embed_tokens(input_ids)

    # ---- what the runner calls --------------------------------------------------------------

    def __call__(
        self,
        kv_caches: list[KVCache],
        input_ids: jax.Array,
        positions: jax.Array,
        md: AttentionMetadata,
    ) -> tuple[list[KVCache], jax.Array]:
        x, residual = self.embed(input_ids), None
        new_caches = []
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual, kv_cache = layer(x, residual, positions, kv_cache, md)
            new_caches.append(kv_cache)
        hidden, _ = self.model.norm.add_and_norm(x, residual)
        return new_caches, hidden

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``[rows, vocab]`` for the selected hidden states."""
        if self.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden).astype(jnp.float32)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2/2.5: Llama with biases on q/k/v (none on o_proj)."""

    @classmethod
    def attention_spec(cls, cfg: Any, layer_idx: int) -> AttentionSpec:
        spec = super().attention_spec(cfg, layer_idx)
        return dataclasses.replace(spec, qkv_bias=True, o_bias=False)
