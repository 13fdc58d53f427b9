"""Phi-3 / Phi-4-mini: Llama with fused checkpoint tensors, partial rotary and a window.

The checkpoint stores ``self_attn.qkv_proj`` (q, k, v stacked on the output axis) and
``mlp.gate_up_proj`` (gate, then up). Rather than a second attention and MLP, the loader cuts
them into the shared modules' ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj``
(:meth:`Phi3ForCausalLM.fused_checkpoint_tensors`); checkpoints already split load as they are.
``partial_rotary_factor`` (Phi-4-mini: 0.75) and ``sliding_window`` (Phi-3-mini: 2047, every
layer) come from the shared rope and attention spec. ``longrope`` scaling (Phi-3/3.5 128k,
Phi-4-mini) picks its frequencies by sequence length and is rejected by the rope layer.
"""

from __future__ import annotations

from typing import Any

from tpu_plugin.models.llama import LlamaForCausalLM, head_dim_of


class Phi3ForCausalLM(LlamaForCausalLM):
    """``Phi3ForCausalLM``: the shared decoder, loaded from fused q/k/v and gate/up tensors."""

    @classmethod
    def fused_checkpoint_tensors(cls, cfg: Any) -> dict[str, list[tuple[str, int]]]:
        q_rows = cfg.num_attention_heads * head_dim_of(cfg)
        kv_rows = cfg.num_key_value_heads * head_dim_of(cfg)
        return {
            "self_attn.qkv_proj": [
                ("self_attn.q_proj", q_rows),
                ("self_attn.k_proj", kv_rows),
                ("self_attn.v_proj", kv_rows),
            ],
            "mlp.gate_up_proj": [
                ("mlp.gate_proj", cfg.intermediate_size),
                ("mlp.up_proj", cfg.intermediate_size),
            ],
        }
