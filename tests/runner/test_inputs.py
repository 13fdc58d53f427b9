"""Scheduler state -> padded step arrays: positions, slots, ragged offsets, padding."""

from __future__ import annotations

import numpy as np
from vllm.sampling_params import SamplingParams

from tpu_plugin.runner.input_batch import InputBatch, RequestState
from tpu_plugin.runner.inputs import prepare_inputs

PAGE = 4


def test_mixed_prefill_chunk_and_decode():
    batch = InputBatch(max_num_reqs=8, max_model_len=64, max_blocks_per_req=16)
    prefill = RequestState("a", list(range(100, 110)), SamplingParams(), [5, 6, 7], 4)
    decode = RequestState("b", [1, 2, 3], SamplingParams(), [2], 3, output_token_ids=[9])
    batch.add(prefill)
    batch.add(decode)
    step, host = prepare_inputs(
        batch, ["a", "b"], [6, 1], page_size=PAGE, num_pages=10, max_num_seqs=8
    )
    ids, pos = np.asarray(step.input_ids), np.asarray(step.positions)
    np.testing.assert_array_equal(ids[:7], [104, 105, 106, 107, 108, 109, 9])
    np.testing.assert_array_equal(pos[:7], [4, 5, 6, 7, 8, 9, 3])
    slots = np.asarray(step.attention.slot_mapping)
    # token at position 4 of "a" lives in its second page (6), offset 0
    np.testing.assert_array_equal(slots[:7], [24, 25, 26, 27, 28, 29, 11])
    assert (slots[7:] >= 10 * PAGE).all(), "padding tokens must write past the cache"
    # 7 tokens -> token bucket 8, whose sequence bucket is min(8, max_num_seqs) (compile.py)
    assert ids.shape == (8,) and np.asarray(step.attention.kv_lens).shape == (8,)
    np.testing.assert_array_equal(np.asarray(step.attention.query_start_loc)[:3], [0, 6, 7])
    np.testing.assert_array_equal(np.asarray(step.attention.kv_lens)[:2], [10, 4])
    np.testing.assert_array_equal(np.asarray(step.logits_indices)[:2], [5, 6])
    assert np.asarray(step.attention.num_seqs).tolist() == [2]
    assert host.completes_prompt.tolist() == [True, True]


def test_partial_prefill_chunk_does_not_sample():
    batch = InputBatch(max_num_reqs=4, max_model_len=64, max_blocks_per_req=16)
    batch.add(RequestState("a", list(range(20)), SamplingParams(), [0, 1, 2, 3, 4], 0))
    _, host = prepare_inputs(batch, ["a"], [8], page_size=PAGE, num_pages=10, max_num_seqs=4)
    assert host.completes_prompt.tolist() == [False]
