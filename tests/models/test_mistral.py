"""Mistral against Hugging Face transformers (PyTorch, fp32), with the sliding window biting.

The window is 16 tokens and every prompt is 20–60 tokens long, so both the prefill (a query
must not see keys 16 or more positions back) and the 32 decoded tokens depend on it.
"""

from __future__ import annotations

from transformers import MistralConfig

from tests.conftest import (
    LONG_PROMPT_LENGTHS,
    SMALL,
    assert_greedy_matches_hf,
    assert_logits_match_hf,
    make_random_checkpoint,
    random_prompts,
)

WINDOW = 16


def mistral_config() -> MistralConfig:
    return MistralConfig(**SMALL, sliding_window=WINDOW, tie_word_embeddings=False)


def test_logits_match_hf(tmp_path):
    model_dir = make_random_checkpoint(tmp_path / "mistral", mistral_config(), norm_noise=0.2)
    prompts = random_prompts(SMALL["vocab_size"], LONG_PROMPT_LENGTHS)
    assert_logits_match_hf(model_dir, prompts, "mistral-window-16")


def test_greedy_ragged_batch_matches_hf(tmp_path, make_llm):
    model_dir = make_random_checkpoint(tmp_path / "mistral", mistral_config(), norm_noise=0.2)
    prompts = random_prompts(SMALL["vocab_size"], LONG_PROMPT_LENGTHS)
    assert_greedy_matches_hf(make_llm, model_dir, prompts)
