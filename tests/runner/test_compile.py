"""Buckets: every step shape prepare_inputs can make is one step_buckets lists (no serving-time
compiles), the list stays small, and the async merge puts device tokens where they belong."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from vllm.sampling_params import SamplingParams

from tpu_plugin.runner.compile import StepBucket, sampler_variants, step_buckets
from tpu_plugin.runner.input_batch import InputBatch, RequestState
from tpu_plugin.runner.inputs import merge_plan, merge_prev_tokens, prepare_inputs

CONFIGS = [
    # max_num_batched_tokens, max_num_seqs, max_model_len, block_size
    (32, 4, 64, 16),
    (64, 8, 256, 16),
    (256, 6, 512, 16),  # max_num_seqs not a power of two
    (512, 16, 512, 32),  # chunking off: the budget is max_model_len
]


def random_step(rng, batch_tokens: int, max_seqs: int, max_len: int) -> tuple[list, list]:
    """A schedulable step: per request (context before the step, tokens this step)."""
    num_reqs = int(rng.integers(1, max_seqs + 1))
    budget = int(rng.integers(num_reqs, batch_tokens + 1))
    cuts = np.sort(rng.choice(np.arange(1, budget), num_reqs - 1, replace=False))
    queries = np.diff(np.concatenate([[0], cuts, [budget]])).tolist()
    queries = [min(q, max_len) for q in queries]
    starts = [int(rng.integers(0, max_len - q + 1)) for q in queries]
    return starts, queries


@pytest.mark.parametrize("bucket_widths", [True, False])
@pytest.mark.parametrize("config", CONFIGS)
def test_every_step_shape_is_a_listed_bucket(config, bucket_widths):
    batch_tokens, max_seqs, max_len, block = config
    buckets = set(step_buckets(*config, bucket_widths))
    pages_per_req = -(-max_len // block)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        starts, queries = random_step(rng, batch_tokens, max_seqs, max_len)
        batch = InputBatch(max_seqs, max_len, pages_per_req)
        ids = []
        for i, (start, query) in enumerate(zip(starts, queries, strict=True)):
            total = start + query
            blocks = list(range(1, -(-total // block) + 1))
            batch.add(RequestState(f"r{i}", [5] * total, SamplingParams(), blocks, start))
            ids.append(f"r{i}")
        step, host = prepare_inputs(
            batch,
            ids,
            queries,
            page_size=block,
            num_pages=1000,
            max_num_seqs=max_seqs,
            bucket_widths=bucket_widths,
        )
        shape = StepBucket(
            step.input_ids.shape[0],
            step.attention.kv_lens.shape[0],
            step.attention.page_indices.shape[1],
        )
        assert step.logits_indices.shape[0] == shape.seqs == host.padded_num_seqs
        assert shape in buckets, f"{shape} (steps {starts}, {queries}) is not precompiled"
        seen.add(shape)
    print(f"{config}: {len(buckets)} buckets, {len(seen)} hit by 300 random steps")


def test_bucket_counts_stay_small():
    counts = {c: len(step_buckets(*c)) for c in CONFIGS}
    print(counts)
    # vLLM's defaults for SmolLM2 at --max-model-len 2048: 8192 tokens, 256 seqs, 16-token pages
    default = step_buckets(8192, 256, 2048, 16)
    print("8192 tokens / 256 seqs / 2048 len:", len(default))
    assert counts[CONFIGS[0]] == 6 and len(default) < 100
    assert all(b.seqs <= b.tokens for b in default)
    # Full-width page tables (the CPU's attention): one bucket per token bucket, 1..8192.
    full_width = step_buckets(8192, 256, 2048, 16, bucket_widths=False)
    assert [b.tokens for b in full_width] == [2**i for i in range(14)]
    assert {b.pages for b in full_width} == {128}


def test_sampler_variants_with_flags_decided_at_run_time():
    """On the CPU (the test backend) greedy, top-k/top-p and whether to compute logprobs are
    decided inside the program: one variant, at the step's logprobs width."""
    variants = sampler_variants(20, 512, "raw_logprobs")
    assert [(v["all_greedy"], v["use_top_k_top_p"], v["num_logprobs"]) for v in variants] == [
        (None, None, 20)
    ]
    assert sampler_variants(-1, 512, "raw_logprobs")[0]["num_logprobs"] == 512


def test_sampler_variants_cover_the_static_flags():
    """TPU (and GPU) programs keep greedy and top-k/top-p static: one per combination."""
    variants = sampler_variants(20, 512, "raw_logprobs", platform="tpu")
    assert len(variants) == 8
    assert {v["num_logprobs"] for v in variants} == {0, 20}
    assert {(v["all_greedy"], v["use_top_k_top_p"]) for v in variants} == {
        (True, False),
        (True, True),
        (False, False),
        (False, True),
    }


def test_async_merge_takes_the_previous_steps_tokens_on_device():
    batch = InputBatch(4, 64, 16)
    # "a" decodes (its token at position 6 is still on the device), "b" is a new prefill.
    batch.add(RequestState("a", [1, 2, 3, 4, 5, 6], SamplingParams(), [0, 1], 6))
    batch.add(RequestState("b", [7, 8, 9], SamplingParams(), [2], 0))
    step, host = prepare_inputs(batch, ["a", "b"], [1, 3], page_size=4, num_pages=8, max_num_seqs=4)
    prev = jnp.asarray([0, 0, 0, 0], jnp.int32).at[batch.req_id_to_slot["a"]].set(42)
    unresolved = {"a": (batch.req_id_to_slot["a"], 6)}
    merged = merge_prev_tokens(merge_plan(step, host, batch, [1, 3], unresolved, prev))
    np.testing.assert_array_equal(np.asarray(merged.input_ids)[:4], [42, 7, 8, 9])
    # Synchronous steps carry no merge fields and are unchanged.
    assert merge_prev_tokens(step) is step
