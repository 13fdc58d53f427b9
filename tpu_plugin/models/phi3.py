"""Phi-3 / Phi-4-mini: Llama with fused checkpoint tensors, partial rotary and a window.

The checkpoint stores ``self_attn.qkv_proj`` (q, k, v concatenated on the output axis) and
``mlp.gate_up_proj`` (gate, then up). The shared modules fuse those projections too, in a
layout that tensor parallelism can split (:class:`tpu_plugin.layers.linear.Fusion`), and the
loader cuts Phi-3's concatenated tensors into their parts before fusing them the port's way,
as it does for every family; checkpoints with the parts stored apart load as well.
``partial_rotary_factor`` (Phi-4-mini: 0.75) and ``sliding_window`` (Phi-3-mini: 2047, every
layer) come from the shared rope and attention spec. ``longrope`` scaling (Phi-3/3.5 128k,
Phi-4-mini) picks its frequencies by sequence length and is rejected by the rope layer.
"""

from __future__ import annotations

from tpu_plugin.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """``Phi3ForCausalLM``: the shared decoder; its fused checkpoint tensors load as they are."""
