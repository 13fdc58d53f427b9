"""Qwen3 (dense): Llama plus a per-head RMSNorm of q and k before rope.

``attention_bias`` covers all four projections (as in Llama, unlike Qwen2), ``head_dim`` is
explicit and usually differs from ``hidden / heads``, and with ``use_sliding_window`` the
layers that ``config.layer_types`` marks ``sliding_attention`` use a window; all of that comes
from the shared spec. Small Qwen3 models tie their embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tpu_plugin.layers.attention import AttentionSpec
from tpu_plugin.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """``Qwen3ForCausalLM``: parameters ``self_attn.q_norm`` / ``self_attn.k_norm`` added."""

    @classmethod
    def attention_spec(cls, cfg: Any, layer_idx: int) -> AttentionSpec:
        spec = super().attention_spec(cfg, layer_idx)
        return dataclasses.replace(spec, qk_norm_eps=cfg.rms_norm_eps)
