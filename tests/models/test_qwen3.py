"""Qwen3 (dense) against Hugging Face transformers (PyTorch, fp32).

Small random-weight checkpoints of the real architecture: explicit ``head_dim`` different from
``hidden / heads`` and tied embeddings (as Qwen3-0.6B/1.7B/4B), untied as the larger ones, and
the ``use_sliding_window`` variant where ``layer_types`` picks the windowed layers. Norm weights
carry noise so the per-head q/k norms are not identity-like.
"""

from __future__ import annotations

import pytest
from transformers import Qwen3Config

from tests.conftest import (
    LONG_PROMPT_LENGTHS,
    PROMPT_LENGTHS,
    SMALL,
    assert_greedy_matches_hf,
    assert_logits_match_hf,
    make_random_checkpoint,
    random_prompts,
)

CONFIGS = {
    "qwen3-tied": lambda: Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True),
    "qwen3-untied-bias": lambda: Qwen3Config(
        **SMALL, head_dim=32, tie_word_embeddings=False, attention_bias=True
    ),
    "qwen3-sliding-window": lambda: Qwen3Config(
        **SMALL, head_dim=32, use_sliding_window=True, sliding_window=16, max_window_layers=1
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(tmp_path, name):
    model_dir = make_random_checkpoint(tmp_path / name, CONFIGS[name](), norm_noise=0.2)
    lengths = LONG_PROMPT_LENGTHS if "sliding" in name else PROMPT_LENGTHS
    prompts = random_prompts(SMALL["vocab_size"], lengths)
    assert_logits_match_hf(model_dir, prompts, name)


def test_greedy_ragged_batch_matches_hf(tmp_path, make_llm):
    model_dir = make_random_checkpoint(tmp_path / "qwen3", CONFIGS["qwen3-tied"](), norm_noise=0.2)
    assert_greedy_matches_hf(make_llm, model_dir, random_prompts(SMALL["vocab_size"]))
