"""Preemption: a KV cache too small for the batch makes vLLM preempt and recompute requests.

vLLM's scheduler frees a running request's blocks when a decode step finds no free block,
and later recomputes it from its prompt plus the tokens generated so far. The runner must
then rebuild that request's state (new block table, recomputed KV) and continue exactly where
it stopped: greedy tokens with a cache that forces preemptions must equal those with a cache
that holds everything.
"""

from __future__ import annotations

from transformers import LlamaConfig

from tests.conftest import SMALL, greedy_tokens, make_random_checkpoint, random_prompts

BLOCK = 16
NEW_TOKENS = 32
PROMPT_LENGTHS = (40, 57, 33, 64, 45, 50, 38, 61)
MAX_MODEL_LEN = 128


def block_bytes(config: LlamaConfig) -> int:
    """One block of every layer's K and V pages (fp32)."""
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * BLOCK * config.num_key_value_heads * head_dim * 4


def preemptions(llm) -> float:
    return sum(
        getattr(m, "value", 0) for m in llm.get_metrics() if m.name == "vllm:num_preemptions"
    )


def test_small_kv_cache_preempts_and_keeps_greedy_tokens(tmp_path, make_llm):
    config = LlamaConfig(**SMALL)
    model_dir = make_random_checkpoint(tmp_path / "llama", config)
    prompts = random_prompts(config.vocab_size, lengths=PROMPT_LENGTHS, seed=3)
    common = dict(
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=len(prompts),
        block_size=BLOCK,
        disable_log_stats=False,
    )
    # The batch needs ~45 blocks at its peak; 12 (+ vLLM's null block) hold two requests at
    # full length, and one max_model_len sequence (8 blocks), so start-up passes.
    small = make_llm(model_dir, kv_cache_memory_bytes=13 * block_bytes(config), **common)
    got = greedy_tokens(small, prompts, NEW_TOKENS)
    preempted = preemptions(small)
    small.llm_engine.engine_core.shutdown()

    large = make_llm(model_dir, kv_cache_memory_bytes=64 * 2**20, **common)
    expected = greedy_tokens(large, prompts, NEW_TOKENS)
    assert preemptions(large) == 0

    print(f"preemptions with the small cache: {preempted:.0f}")
    assert preempted > 0, "the small cache did not force any preemption"
    mismatched = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
    assert not mismatched, f"prompts {mismatched} differ after preemption"
    assert all(len(t) == NEW_TOKENS for t in got)
