"""Llama-family ports against Hugging Face transformers (PyTorch, fp32).

Small random-weight checkpoints of the real architectures are made in the test. Checks: logits
at the last position (rel. error <= 1e-4), and greedy tokens through ``vllm.LLM`` identical to
HF for 32 new tokens on 8 prompts of different lengths submitted together (ragged batching).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from transformers import LlamaConfig, Qwen2Config

from tests.conftest import (
    greedy_tokens,
    hf_greedy,
    hf_last_logits,
    make_random_checkpoint,
    random_prompts,
)
from tpu_kernels.ragged_paged_attention import reference
from tpu_plugin.layers.attention import AttentionMetadata
from tpu_plugin.models.loader import load_model

SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
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
    "smollm2-tied": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True),
    "qwen2-qkv-bias": lambda: Qwen2Config(**SMALL, tie_word_embeddings=False),
}


def jax_last_logits(model_dir, prompts: list[list[int]]) -> np.ndarray:
    """The port's last-position logits, each prompt run alone through fresh pages."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    model = load_model(str(model_dir), cfg, jnp.float32)
    page_size, rows = 16, []
    for prompt in prompts:
        n = len(prompt)
        pages = -(-n // page_size)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        shape = (pages, page_size, cfg.num_key_value_heads, head_dim)
        caches = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
        md = AttentionMetadata(
            slot_mapping=jnp.arange(n),
            kv_lens=jnp.array([n]),
            page_indices=jnp.arange(pages)[None],
            query_start_loc=jnp.array([0, n]),
            num_seqs=jnp.array([1]),
        )
        _, hidden = model(caches, jnp.array(prompt), jnp.arange(n), md)
        rows.append(np.asarray(model.compute_logits(hidden[-1:]))[0])
    return np.stack(rows)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(tmp_path, name):
    model_dir = make_random_checkpoint(tmp_path / name, CONFIGS[name]())
    prompts = random_prompts(SMALL["vocab_size"])
    ours, theirs = jax_last_logits(model_dir, prompts), hf_last_logits(model_dir, prompts)
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"{name}: last-position logits rel. error {rel:.2e}")
    assert rel <= 1e-4


@pytest.mark.parametrize("name", ["llama", "qwen2-qkv-bias"])
def test_greedy_ragged_batch_matches_hf(tmp_path, make_llm, name):
    model_dir = make_random_checkpoint(tmp_path / name, CONFIGS[name]())
    prompts = random_prompts(SMALL["vocab_size"])
    expected = hf_greedy(model_dir, prompts, 32)
    llm = make_llm(model_dir, skip_tokenizer_init=True, dtype="float32")
    assert greedy_tokens(llm, prompts, 32) == expected


def test_reference_attention_is_what_the_model_uses():
    """Guards the CPU default: without an override the layer runs the jnp reference."""
    from tpu_plugin.layers.attention import attention_kernel

    assert attention_kernel() is reference.ragged_paged_attention
