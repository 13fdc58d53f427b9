"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm) with sparse mixture-of-experts MLPs.

A layer is sparse unless ``config.mlp_only_layers`` lists it or ``(layer + 1)`` is not a
multiple of ``decoder_sparse_step`` (every released Qwen3-MoE has step 1 and no dense layers,
but both are honoured); dense layers keep the plain gated MLP of width ``intermediate_size``.
A sparse layer's ``mlp`` routes each token to ``num_experts_per_tok`` of ``num_experts``
experts of width ``moe_intermediate_size``: softmax over all experts, top-k, and, when
``norm_topk_prob``, the k weights renormalised to sum to 1. No shared experts.

Checkpoints on the Hub store experts apart (``mlp.experts.5.gate_proj.weight``); the loader
stacks them (:meth:`Qwen3MoeForCausalLM.stacked_checkpoint_tensors`), and a checkpoint holding
transformers 5's fused ``mlp.experts.gate_up_proj`` / ``down_proj`` loads as is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tpu_plugin.layers.attention import AttentionMetadata, AttentionSpec, KVCache, SelfAttention
from tpu_plugin.layers.moe import MoESpec, SparseMoeBlock, expert_stacking_rules
from tpu_plugin.layers.norm import RMSNorm
from tpu_plugin.models.llama import LlamaDecoderLayer
from tpu_plugin.models.qwen3 import Qwen3ForCausalLM


class MoeDecoderLayer(nnx.Module):
    """The Llama pre-norm block with a :class:`SparseMoeBlock` in place of the dense MLP.

    ``ffn_name`` is the checkpoint's module name of the block (``mlp`` in Qwen-MoE,
    ``block_sparse_moe`` in Mixtral), so parameters keep Hugging Face's names.
    """

    def __init__(
        self, cfg: Any, spec: AttentionSpec, moe: MoESpec, dtype: jnp.dtype, ffn_name: str = "mlp"
    ):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = SelfAttention(spec, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        setattr(self, ffn_name, SparseMoeBlock(moe, dtype))
        self.ffn_name = ffn_name

    def __call__(
        self,
        x: jax.Array,
        residual: jax.Array | None,
        positions: jax.Array,
        kv_cache: KVCache,
        md: AttentionMetadata,
    ) -> tuple[jax.Array, jax.Array, KVCache]:
        """The residual stream carried beside the output (``LlamaDecoderLayer``'s contract)."""
        h, residual = self.input_layernorm.add_and_norm(x, residual)
        attn_out, kv_cache = self.self_attn(h, positions, kv_cache, md)
        h, residual = self.post_attention_layernorm.add_and_norm(attn_out, residual)
        return getattr(self, self.ffn_name)(h), residual, kv_cache


def is_sparse_layer(cfg: Any, layer_idx: int) -> bool:
    """Whether Qwen2/3-MoE's layer ``layer_idx`` is a mixture of experts (HF's rule)."""
    return (
        layer_idx not in (getattr(cfg, "mlp_only_layers", None) or [])
        and cfg.num_experts > 0
        and (layer_idx + 1) % getattr(cfg, "decoder_sparse_step", 1) == 0
    )


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """``Qwen3MoeForCausalLM``: Qwen3 with :class:`SparseMoeBlock` MLPs on the sparse layers."""

    @classmethod
    def moe_spec(cls, cfg: Any) -> MoESpec:
        return MoESpec(
            hidden_size=cfg.hidden_size,
            num_experts=cfg.num_experts,
            top_k=cfg.num_experts_per_tok,
            intermediate_size=cfg.moe_intermediate_size,
            activation=getattr(cfg, "hidden_act", "silu"),
            scoring="softmax",
            renormalize=bool(cfg.norm_topk_prob),
        )

    def decoder_layer(self, cfg: Any, layer_idx: int, dtype: jnp.dtype) -> nnx.Module:
        spec = self.attention_spec(cfg, layer_idx)
        if is_sparse_layer(cfg, layer_idx):
            return MoeDecoderLayer(cfg, spec, self.moe_spec(cfg), dtype)
        return LlamaDecoderLayer(cfg, spec, dtype)

    @classmethod
    def stacked_checkpoint_tensors(cls, cfg: Any) -> dict[str, tuple[str, int, int | None]]:
        """Per-expert ``mlp.experts.N.{gate,up,down}_proj.weight`` → the stacked parameters."""
        return expert_stacking_rules("mlp", cfg.moe_intermediate_size)
