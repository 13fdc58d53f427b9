"""Gemma 3 text (``Gemma3ForCausalLM``, config ``model_type: gemma3_text``) in flax nnx.

What differs from Llama, each taken from the shared layers rather than re-implemented:

* local (sliding-window) layers interleaved with global ones, per ``config.layer_types``, each
  type with its own rope parameters (``rope_local_base_freq`` becomes the sliding layers'
  theta; the global layers may use linear scaling);
* the softmax scale is ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``;
* q/k RMSNorm per head, and every RMSNorm in Gemma's ``(1 + weight)`` form;
* four norms per block (post-attention and pre/post-feed-forward) around a tanh-GELU MLP;
* embeddings scaled by ``sqrt(hidden_size)``, rounded to the weights' dtype as HF does;
* ``final_logit_softcapping``: ``cap * tanh(logits / cap)`` when configured.

``attn_logit_softcapping`` is *not* applied: Hugging Face's Gemma 3 (transformers 5.19) and
vLLM's both ignore it (released Gemma 3 configs set it to null); a config that sets it gets a
warning, and the port matches the references.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from vllm.logger import init_logger

from tpu_plugin.layers.attention import AttentionMetadata, AttentionSpec, KVCache, SelfAttention
from tpu_plugin.layers.mlp import GatedMLP
from tpu_plugin.layers.norm import RMSNorm
from tpu_plugin.models.llama import LlamaForCausalLM

logger = init_logger(__name__)


class Gemma3DecoderLayer(nnx.Module):
    """``x + post_attn_norm(attn(in_norm(x)))``, then ``x + post_ff_norm(mlp(pre_ff_norm(x)))``."""

    def __init__(self, cfg: Any, spec: AttentionSpec, dtype: jnp.dtype):
        def norm() -> RMSNorm:
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, weight_offset=1.0)

        self.input_layernorm = norm()
        self.self_attn = SelfAttention(spec, dtype)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = GatedMLP(
            cfg.hidden_size, cfg.intermediate_size, dtype, act=cfg.hidden_activation
        )
        self.post_feedforward_layernorm = norm()

    def __call__(
        self,
        x: jax.Array,
        residual: jax.Array | None,
        positions: jax.Array,
        kv_cache: KVCache,
        md: AttentionMetadata,
    ) -> tuple[jax.Array, jax.Array, KVCache]:
        """The residual stream carried beside the output (``LlamaDecoderLayer``'s contract):
        each residual add is done by the pre-norm that follows it."""
        h, residual = self.input_layernorm.add_and_norm(x, residual)
        attn_out, kv_cache = self.self_attn(h, positions, kv_cache, md)
        attn_out = self.post_attention_layernorm(attn_out)
        h, residual = self.pre_feedforward_layernorm.add_and_norm(attn_out, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual, kv_cache


class Gemma3ForCausalLM(LlamaForCausalLM):
    """``Gemma3ForCausalLM``: the shared forward loop with Gemma's layer, embedding and head."""

    norm_offset = 1.0

    def __init__(self, cfg: Any, dtype: jnp.dtype):
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ValueError(
                "Gemma 3 with use_bidirectional_attention=True (an embedding model) is not "
                "supported; tpu-plugin runs causal generation only"
            )
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            logger.warning(
                "Gemma 3 config sets attn_logit_softcapping=%s; like Hugging Face transformers "
                "and vLLM, tpu-plugin does not apply it to Gemma 3",
                cfg.attn_logit_softcapping,
            )
        super().__init__(cfg, dtype)
        self.embed_scale = float(cfg.hidden_size**0.5)
        self.final_logit_softcapping = getattr(cfg, "final_logit_softcapping", None)

    @classmethod
    def attention_spec(cls, cfg: Any, layer_idx: int) -> AttentionSpec:
        spec = super().attention_spec(cfg, layer_idx)
        return dataclasses.replace(
            spec,
            qk_norm_eps=cfg.rms_norm_eps,
            qk_norm_offset=1.0,
            sm_scale=float(cfg.query_pre_attn_scalar) ** -0.5,
        )

    def decoder_layer(self, cfg: Any, layer_idx: int, dtype: jnp.dtype) -> nnx.Module:
        return Gemma3DecoderLayer(cfg, self.attention_spec(cfg, layer_idx), dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        x = self.model.embed_tokens(input_ids)
        # HF multiplies by the scale cast to the weights' dtype (sqrt(2304) is not exact in bf16).
        return x * jnp.asarray(self.embed_scale, x.dtype)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        logits = super().compute_logits(hidden)
        cap = self.final_logit_softcapping
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return logits
