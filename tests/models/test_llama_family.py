"""Llama-family ports against Hugging Face transformers (PyTorch, fp32).

Small random-weight checkpoints of the real architectures are made in the test. Checks: logits
at the last position (rel. error <= 1e-4), and greedy tokens through ``vllm.LLM`` identical to
HF for 32 new tokens on 8 prompts of different lengths submitted together (ragged batching).
"""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, Qwen2Config

from tests.conftest import (
    SMALL,
    greedy_tokens,
    hf_greedy,
    hf_last_logits,
    jax_last_logits,
    make_random_checkpoint,
    max_rel_error,
    random_prompts,
)
from tpu_kernels.ragged_paged_attention import xla

CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, tie_word_embeddings=False, rope_theta=10000.0),
    "llama3-rope-scaling": lambda: LlamaConfig(
        **SMALL,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=500000.0,
    ),
    # The other scaling rules in use (YaRN: Qwen long-context, DeepSeek; linear: Gemma 3's
    # global layers, long-context fine-tunes). Both change every frequency, so short prompts
    # test them; YaRN also scales cos/sin by its attention factor.
    "yarn-rope-scaling": lambda: LlamaConfig(
        **SMALL,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        rope_theta=10000.0,
    ),
    "linear-rope-scaling": lambda: LlamaConfig(
        **SMALL, rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=10000.0
    ),
    "smollm2-tied": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True),
    "qwen2-qkv-bias": lambda: Qwen2Config(**SMALL, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(tmp_path, name):
    model_dir = make_random_checkpoint(tmp_path / name, CONFIGS[name]())
    prompts = random_prompts(SMALL["vocab_size"])
    ours, theirs = jax_last_logits(model_dir, prompts), hf_last_logits(model_dir, prompts)
    rel = max_rel_error(ours, theirs)
    print(f"{name}: last-position logits rel. error {rel:.2e}")
    assert rel <= 1e-4


@pytest.mark.parametrize("name", ["llama", "qwen2-qkv-bias"])
def test_greedy_ragged_batch_matches_hf(tmp_path, make_llm, name):
    model_dir = make_random_checkpoint(tmp_path / name, CONFIGS[name]())
    prompts = random_prompts(SMALL["vocab_size"])
    expected = hf_greedy(model_dir, prompts, 32)
    llm = make_llm(model_dir, skip_tokenizer_init=True, dtype="float32")
    assert greedy_tokens(llm, prompts, 32) == expected


def test_cpu_attention_is_what_the_model_uses():
    """Guards the CPU default: without an override the layer runs the jnp ``xla`` kernel."""
    from tpu_plugin.layers.attention import attention_kernel

    assert attention_kernel() is xla.ragged_paged_attention
