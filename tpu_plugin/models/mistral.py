"""Mistral: the Llama architecture with a sliding window on every layer.

Hugging Face's Mistral applies ``config.sliding_window`` (when set; Mistral 7B v0.1 uses 4096,
later versions ``null``) to all layers, which the shared
:func:`~tpu_plugin.layers.attention.sliding_window_of` already does for configs without
``layer_types``. The KV cache stays one full-attention group (see
:mod:`tpu_plugin.layers.attention`): all blocks are kept and the kernel masks the window.
"""

from __future__ import annotations

from tpu_plugin.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """``MistralForCausalLM``: nothing beyond Llama and the windowed attention spec."""
