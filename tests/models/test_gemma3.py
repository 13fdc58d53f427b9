"""Gemma 3 text (``Gemma3ForCausalLM``) against Hugging Face transformers (PyTorch, fp32).

The config keeps Gemma 3's structure at small size: a sliding-window layer (window 16, prompts of
20–60 tokens so it bites) followed by a global one, separate rope parameters per layer type (the
global layers with linear scaling as in Gemma 3 4B+), ``query_pre_attn_scalar`` different from
``head_dim``, tied embeddings scaled by ``sqrt(hidden)``, a final logit soft cap, and noisy norm
weights so the ``(1 + weight)`` norms and per-head q/k norms are exercised.
"""

from __future__ import annotations

from transformers import Gemma3TextConfig

from tests.conftest import LONG_PROMPT_LENGTHS, SMALL
from tests.models.helpers import check_greedy_matches_hf, check_logits_match_hf

# Gemma 2's final cap; released Gemma 3 configs set none, but the port must honour one when set.
FINAL_SOFTCAP = 30.0


def gemma3_config() -> Gemma3TextConfig:
    return Gemma3TextConfig(
        **SMALL,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
        final_logit_softcapping=FINAL_SOFTCAP,
        tie_word_embeddings=True,
        architectures=["Gemma3ForCausalLM"],
    )


CONFIGS = {"gemma3-window-16": gemma3_config}


def test_logits_match_hf(tmp_path):
    check_logits_match_hf(tmp_path, CONFIGS, "gemma3-window-16", LONG_PROMPT_LENGTHS)


def test_greedy_ragged_batch_matches_hf(tmp_path, make_llm):
    check_greedy_matches_hf(tmp_path, make_llm, CONFIGS, "gemma3-window-16", LONG_PROMPT_LENGTHS)
