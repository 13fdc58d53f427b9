"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-head latent attention and DeepSeekMoE.

Every layer attends with MLA (:mod:`tpu_plugin.layers.mla`), whose KV cache holds one
compressed latent plus one shared rotary key per token; :meth:`DeepseekV3ForCausalLM.
kv_cache_layout` tells the runner so (one ``kv_lora_rank + qk_rope_head_dim`` wide "head",
no separate V: vLLM's ``MLAAttentionSpec``). The first ``first_k_dense_replace`` layers have a
dense gated MLP; the rest a :class:`~tpu_plugin.layers.moe.SparseMoeBlock`: sigmoid router
scores, expert choice on the scores plus ``e_score_correction_bias`` restricted to the
``topk_group`` best of ``n_group`` expert groups, weights renormalised (``norm_topk_prob``) and
scaled by ``routed_scaling_factor``, plus ``n_shared_experts`` always-on experts fused into one
MLP of width ``n_shared_experts x moe_intermediate_size`` (``shared_experts``).

Not supported (start-up errors): FP8 block-quantized checkpoints (the released DeepSeek-V3
weights; dequantize to bf16 first). The multi-token-prediction layers some checkpoints carry
(``model.layers.{num_hidden_layers}``) are not used: the loader ignores them with a warning.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tpu_plugin.layers.attention import AttentionMetadata
from tpu_plugin.layers.mla import LatentCache, MLAAttention, MLASpec, page_row_width
from tpu_plugin.layers.mlp import GatedMLP
from tpu_plugin.layers.moe import MoESpec, SparseMoeBlock, expert_stacking_rules
from tpu_plugin.layers.norm import RMSNorm
from tpu_plugin.models.llama import LlamaForCausalLM


def moe_spec(cfg: Any) -> MoESpec:
    """The routed + shared experts of a DeepSeek-V3 MoE layer, as transformers computes them."""
    return MoESpec(
        hidden_size=cfg.hidden_size,
        num_experts=cfg.n_routed_experts,
        top_k=cfg.num_experts_per_tok,
        intermediate_size=cfg.moe_intermediate_size,
        activation=getattr(cfg, "hidden_act", "silu"),
        scoring="sigmoid",
        renormalize=bool(cfg.norm_topk_prob),
        correction_bias=True,
        num_groups=cfg.n_group,
        topk_groups=cfg.topk_group,
        routed_scaling_factor=float(cfg.routed_scaling_factor),
        shared_intermediate_size=cfg.moe_intermediate_size * (cfg.n_shared_experts or 0),
        shared_name="shared_experts",
    )


def check_config(cfg: Any) -> None:
    """Fails at start-up, naming the fix, on what this port does not run."""
    quant = getattr(cfg, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ValueError(
            f"DeepSeek-V3 checkpoints quantized with {method!r} are not supported by tpu-plugin; "
            "use a bf16/fp32 (dequantized) checkpoint"
        )
    experts, groups = cfg.n_routed_experts, cfg.n_group
    if cfg.first_k_dense_replace < cfg.num_hidden_layers:
        if not groups or not cfg.topk_group:
            raise ValueError("DeepSeek-V3 routing needs n_group and topk_group set in config.json")
        if experts % groups or experts // groups < 2:
            raise ValueError(
                f"n_routed_experts={experts} must split into n_group={groups} groups of at "
                "least 2 experts (DeepSeek's group score sums each group's 2 best experts)"
            )


class DeepseekV3DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + mla(norm(x))``, then ``x + mlp(norm(x))`` (dense or MoE)."""

    def __init__(self, cfg: Any, layer_idx: int, dtype: jnp.dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLAAttention(MLASpec.from_config(cfg), dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        act = getattr(cfg, "hidden_act", "silu")
        if layer_idx >= cfg.first_k_dense_replace:
            self.mlp = SparseMoeBlock(moe_spec(cfg), dtype)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype, act=act)

    def __call__(
        self,
        x: jax.Array,
        residual: jax.Array | None,
        positions: jax.Array,
        cache: LatentCache,
        md: AttentionMetadata,
    ) -> tuple[jax.Array, jax.Array, LatentCache]:
        """The residual stream carried beside the output (``LlamaDecoderLayer``'s contract)."""
        h, residual = self.input_layernorm.add_and_norm(x, residual)
        attn_out, cache = self.self_attn(h, positions, cache, md)
        h, residual = self.post_attention_layernorm.add_and_norm(attn_out, residual)
        return self.mlp(h), residual, cache


class DeepseekV3ForCausalLM(LlamaForCausalLM):
    """The shared decoder loop (embedding, layers, norm, ``lm_head``) with DeepSeek's layers.

    The per-layer cache passed to and returned from :meth:`__call__` is one latent page array
    (see :meth:`kv_cache_layout`), not a ``(k, v)`` pair.
    """

    def decoder_layer(self, cfg: Any, layer_idx: int, dtype: jnp.dtype) -> nnx.Module:
        if layer_idx == 0:
            check_config(cfg)
        return DeepseekV3DecoderLayer(cfg, layer_idx, dtype)

    @classmethod
    def kv_cache_layout(cls, cfg: Any) -> tuple[int, int, bool]:
        """``(num_kv_heads, head_dim, latent)`` of one layer's pages: MLA caches one head of
        ``kv_lora_rank + qk_rope_head_dim`` values per token, with no separate V, in rows
        padded to whole TPU lanes (``mla.page_row_width``: 576 -> 640 for DeepSeek-V3)."""
        return 1, page_row_width(cfg.kv_lora_rank + cfg.qk_rope_head_dim), True

    @classmethod
    def stacked_checkpoint_tensors(cls, cfg: Any) -> dict[str, tuple[str, int, int | None]]:
        """Per-expert checkpoint tensors (``mlp.experts.5.gate_proj.weight``) → stacked
        ``mlp.experts.gate_up_proj`` / ``down_proj`` (see :mod:`tpu_plugin.models.loader`)."""
        return expert_stacking_rules("mlp", cfg.moe_intermediate_size)
