"""Async scheduling (``LLM(async_scheduling=True)``) gives the synchronous engine's tokens.

Step N+1 is prepared while step N runs, its inputs taking step N's sampled tokens on the device
(tpu_plugin/runner/async_output.py); greedy and seeded sampling must not notice.
"""

from __future__ import annotations

from transformers import LlamaConfig

from tests.conftest import SMALL, greedy_tokens, make_random_checkpoint, random_prompts


def test_async_scheduling_matches_sync(tmp_path, make_llm):
    from vllm import SamplingParams

    model_dir = make_random_checkpoint(tmp_path / "llama", LlamaConfig(**SMALL))
    prompts = random_prompts(512, lengths=(3, 17, 5, 40, 9, 1, 28, 12, 60))
    seeded = SamplingParams(
        temperature=0.9, seed=3, max_tokens=16, ignore_eos=True, presence_penalty=0.5
    )
    results = {}
    for async_scheduling in (False, True):
        llm = make_llm(
            model_dir,
            skip_tokenizer_init=True,
            dtype="float32",
            max_model_len=128,
            max_num_seqs=4,  # 9 prompts: requests wait, join and leave mid-run
            max_num_batched_tokens=32,  # chunked prefill of the longer prompts
            kv_cache_memory_bytes=8 * 2**20,
            async_scheduling=async_scheduling,
        )
        config = llm.llm_engine.vllm_config.scheduler_config
        assert config.async_scheduling is async_scheduling
        greedy = greedy_tokens(llm, prompts, 32)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], seeded, use_tqdm=False)
        results[async_scheduling] = (greedy, [list(o.outputs[0].token_ids) for o in outs])
        llm.llm_engine.engine_core.shutdown()
    assert results[True][0] == results[False][0], "greedy tokens differ under async scheduling"
    assert results[True][1] == results[False][1], "seeded tokens differ under async scheduling"
