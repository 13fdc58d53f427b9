"""Mistral against Hugging Face transformers (PyTorch, fp32), with the sliding window biting.

The window is 16 tokens and every prompt is 20–60 tokens long, so both the prefill (a query
must not see keys 16 or more positions back) and the 32 decoded tokens depend on it.
"""

from __future__ import annotations

from transformers import MistralConfig

from tests.conftest import LONG_PROMPT_LENGTHS, SMALL
from tests.models.helpers import check_greedy_matches_hf, check_logits_match_hf

WINDOW = 16


def mistral_config() -> MistralConfig:
    return MistralConfig(**SMALL, sliding_window=WINDOW, tie_word_embeddings=False)


CONFIGS = {"mistral-window-16": mistral_config}


def test_logits_match_hf(tmp_path):
    check_logits_match_hf(tmp_path, CONFIGS, "mistral-window-16", LONG_PROMPT_LENGTHS)


def test_greedy_ragged_batch_matches_hf(tmp_path, make_llm):
    check_greedy_matches_hf(tmp_path, make_llm, CONFIGS, "mistral-window-16", LONG_PROMPT_LENGTHS)
