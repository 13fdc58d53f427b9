"""Mixtral: Mistral's decoder with a sparse mixture of experts in place of every MLP.

Every layer's ``block_sparse_moe`` routes each token to ``num_experts_per_tok`` (2) of
``num_local_experts`` (8) experts of width ``intermediate_size``: softmax over the router
(``gate``) logits, top-k, weights renormalised to sum to 1 (always, unlike Qwen-MoE's
``norm_topk_prob``). Attention is Mistral's: ``sliding_window`` on every layer when set
(``null`` in Mixtral 8x7B v0.1 and 8x22B, so usually full attention).

Checkpoints on the Hub store each expert apart with Mixtral's own names, ``w1`` (gate), ``w3``
(up) and ``w2`` (down): ``block_sparse_moe.experts.3.w1.weight``; the loader stacks them
(:meth:`MixtralForCausalLM.stacked_checkpoint_tensors`). transformers 5 names the block ``mlp``
in memory and stores fused ``experts.gate_up_proj`` / ``down_proj`` there (it writes the
per-expert layout back when saving); such fused tensors load too, renamed to
``block_sparse_moe``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from tpu_plugin.layers.moe import MoESpec, expert_stacking_rules
from tpu_plugin.models.mistral import MistralForCausalLM
from tpu_plugin.models.qwen3_moe import MoeDecoderLayer

BLOCK = "block_sparse_moe"


class MixtralForCausalLM(MistralForCausalLM):
    """``MixtralForCausalLM``: Mistral with a :class:`SparseMoeBlock` in every layer."""

    @classmethod
    def moe_spec(cls, cfg: Any) -> MoESpec:
        return MoESpec(
            hidden_size=cfg.hidden_size,
            num_experts=cfg.num_local_experts,
            top_k=cfg.num_experts_per_tok,
            intermediate_size=cfg.intermediate_size,
            activation=getattr(cfg, "hidden_act", "silu"),
            scoring="softmax",
            renormalize=True,
        )

    def decoder_layer(self, cfg: Any, layer_idx: int, dtype: jnp.dtype) -> nnx.Module:
        spec = self.attention_spec(cfg, layer_idx)
        return MoeDecoderLayer(cfg, spec, self.moe_spec(cfg), dtype, ffn_name=BLOCK)

    @classmethod
    def stacked_checkpoint_tensors(cls, cfg: Any) -> dict[str, tuple[str, int, int | None]]:
        """Per-expert ``block_sparse_moe.experts.N.w{1,3,2}.weight`` → the stacked parameters."""
        return expert_stacking_rules(BLOCK, cfg.intermediate_size, names=("w1", "w3", "w2"))

    @classmethod
    def fused_checkpoint_tensors(cls, cfg: Any) -> dict[str, list[tuple[str, int]]]:
        """transformers 5's in-memory names (``mlp.gate``, fused ``mlp.experts``) → ours."""
        experts = cfg.num_local_experts
        return {
            "mlp.gate": [(f"{BLOCK}.gate", experts)],
            "mlp.experts": [(f"{BLOCK}.experts", experts)],
        }
