"""The Pallas TPU attention kernel (TPU interpret mode on CPU) inside a real model run.

A small Llama through ``vllm.LLM`` with ``TPU_PLUGIN_ATTENTION=pallas-interpret`` must give the
same greedy tokens as with the pure-jnp reference: prefill chunks, decodes and a ragged batch
go through the kernel exactly as they would on a TPU, only interpreted.
"""

from __future__ import annotations

from transformers import LlamaConfig

from tests.conftest import SMALL, greedy_tokens, make_random_checkpoint, random_prompts


def test_interpret_kernel_matches_reference_in_vllm(tmp_path, make_llm, monkeypatch):
    model_dir = make_random_checkpoint(tmp_path / "llama", LlamaConfig(**SMALL))
    prompts = random_prompts(SMALL["vocab_size"], lengths=(5, 23, 11))
    kwargs = dict(skip_tokenizer_init=True, dtype="float32", block_size=16)

    monkeypatch.setenv("TPU_PLUGIN_ATTENTION", "reference")
    expected = greedy_tokens(make_llm(model_dir, **kwargs), prompts, 8)
    monkeypatch.setenv("TPU_PLUGIN_ATTENTION", "pallas-interpret")
    assert greedy_tokens(make_llm(model_dir, **kwargs), prompts, 8) == expected
