"""``vllm.LLM`` end to end on the plugin: real weights, chunked prefill, prefix caching."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, GPT2Config, LlamaConfig

from tests.conftest import (
    SMALL,
    greedy_tokens,
    hf_greedy,
    make_random_checkpoint,
    random_prompts,
)

TEXT_PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:",
    "def add(a, b):",
    "The three primary colors are",
    "Once upon a time, in a small village,",
]


def test_smollm2_greedy_matches_hf(smollm2_dir, make_llm):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tokenizer(p).input_ids for p in TEXT_PROMPTS]
    expected = hf_greedy(smollm2_dir, prompts, 32)
    llm = make_llm(smollm2_dir, dtype="float32")
    assert greedy_tokens(llm, prompts, 32) == expected


def test_generate_and_chat_with_text(smollm2_dir, make_llm):
    from vllm import SamplingParams

    llm = make_llm(smollm2_dir)
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    assert "Paris" in out[0].outputs[0].text
    reply = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=24),
    )
    assert "Paris" in reply[0].outputs[0].text


SMALL_LLAMA = dict(SMALL, max_position_embeddings=1024)  # room for the 300-token prompt


def test_chunked_prefill_and_prefix_caching_change_nothing(tmp_path, make_llm):
    from vllm import SamplingParams

    model_dir = make_random_checkpoint(tmp_path / "llama", LlamaConfig(**SMALL_LLAMA))
    long_prompt = random_prompts(512, lengths=(300,), seed=7)[0]
    shared_prefix = long_prompt[:200] + random_prompts(512, lengths=(40,), seed=8)[0]
    ragged = random_prompts(512)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def run(llm) -> tuple[list[list[int]], int]:
        first = greedy_tokens(llm, [long_prompt], 16)
        second = llm.generate([{"prompt_token_ids": shared_prefix}], params, use_tqdm=False)[0]
        mixed = greedy_tokens(llm, ragged, 16)  # prefill chunks and decodes share steps
        return first + [list(second.outputs[0].token_ids)] + mixed, second.num_cached_tokens

    plain = make_llm(
        model_dir,
        skip_tokenizer_init=True,
        dtype="float32",
        enable_chunked_prefill=False,
        enable_prefix_caching=False,
        max_num_batched_tokens=512,
    )
    expected, cached_without = run(plain)
    featured = make_llm(
        model_dir,
        skip_tokenizer_init=True,
        dtype="float32",
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        max_num_batched_tokens=64,
        block_size=16,
    )
    got, cached_with = run(featured)
    assert cached_without == 0
    assert cached_with >= 192, "the shared 200-token prefix should come from the cache"
    assert got == expected


def test_unsupported_architecture_fails_at_start_naming_supported(tmp_path, monkeypatch):
    """GPT-2 runs through torchax by default; forcing the native path names the options."""
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setenv("TPU_PLUGIN_MODEL_IMPL", "jax")

    model_dir = make_random_checkpoint(
        tmp_path / "gpt2", GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128)
    )
    with pytest.raises(
        ValueError, match="GPT2LMHeadModel has no JAX port.*LlamaForCausalLM.*torchax"
    ):
        EngineArgs(model=str(model_dir), skip_tokenizer_init=True).create_engine_config()
