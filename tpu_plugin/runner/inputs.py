"""Scheduler output + persistent batch -> padded device arrays for one jitted step.

Everything here is vectorised NumPy over the scheduled requests; the only Python loop is over
requests to read their scheduled-token counts. Tokens are packed request after request
(prefill chunks and decodes mixed), then padded to the token bucket; requests to the sequence
bucket of that token bucket (compile.py); the page table to the page bucket. Padding tokens
write to a slot past the end of the cache (dropped) and belong to no real sequence, so they
cannot change a real output.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from tpu_plugin.layers.attention import AttentionMetadata
from tpu_plugin.runner.compile import page_bucket, step_seq_bucket, token_bucket
from tpu_plugin.runner.input_batch import InputBatch


class StepInputs(NamedTuple):
    """The model's inputs for one step (device arrays, bucketed shapes)."""

    input_ids: jax.Array  # [T]
    positions: jax.Array  # [T]
    attention: AttentionMetadata
    logits_indices: jax.Array  # [S] last scheduled token of each request
    # Async scheduling (async_output.py): tokens sampled by the previous step, still on the
    # device, one per batch slot; token ``merge_dst[i]`` of this step (T = none) takes
    # ``prev_tokens[merge_src[i]]``. None when scheduling synchronously.
    prev_tokens: jax.Array | None = None  # [max_num_seqs] int32
    merge_dst: jax.Array | None = None  # [S] int32
    merge_src: jax.Array | None = None  # [S] int32
    # LoRA (runner/lora.py): each token's adapter slot, -1 for the base model; None when no
    # request of the step has an adapter (the base model's program).
    lora_slots: jax.Array | None = None  # [T] int32


class HostStep(NamedTuple):
    """Host-side facts of the step the runner needs after the forward pass."""

    req_ids: list[str]
    slots: np.ndarray  # [num_reqs]
    completes_prompt: np.ndarray  # [num_reqs] bool: this step reaches the request's last token
    padded_num_seqs: int


def prepare_inputs(
    batch: InputBatch,
    req_ids: list[str],
    num_scheduled: list[int],
    *,
    page_size: int,
    num_pages: int,
    max_num_seqs: int,
    bucket_widths: bool = True,
) -> tuple[StepInputs, HostStep]:
    """Builds the step's arrays for ``req_ids`` (each with ``num_scheduled`` new tokens).

    ``bucket_widths``: whether the page table's width is bucketed (compile.page_bucket).
    """
    slots = np.fromiter((batch.req_id_to_slot[r] for r in req_ids), np.int32, len(req_ids))
    query_lens = np.asarray(num_scheduled, np.int32)
    num_reqs, num_tokens = len(req_ids), int(query_lens.sum())
    padded_tokens = token_bucket(num_tokens)
    padded_seqs = step_seq_bucket(padded_tokens, max_num_seqs)

    starts = batch.num_computed_tokens[slots]
    kv_lens = starts + query_lens
    cu_query = np.cumsum(query_lens, dtype=np.int32)
    token_req = np.repeat(np.arange(num_reqs, dtype=np.int32), query_lens)
    offset_in_req = np.arange(num_tokens, dtype=np.int32) - (cu_query - query_lens)[token_req]
    positions = starts[token_req] + offset_in_req
    token_slots = slots[token_req]

    input_ids = np.zeros(padded_tokens, np.int32)
    input_ids[:num_tokens] = batch.token_ids[token_slots, positions]
    padded_positions = np.zeros(padded_tokens, np.int32)
    padded_positions[:num_tokens] = positions
    slot_mapping = np.full(padded_tokens, num_pages * page_size, np.int32)
    pages = batch.block_table[token_slots, positions // page_size]
    slot_mapping[:num_tokens] = pages * page_size + positions % page_size

    pages_needed = int(-(-kv_lens.max() // page_size)) if num_reqs else 1
    width = page_bucket(pages_needed, batch.block_table.shape[1], page_size, bucket_widths)
    page_indices = np.zeros((padded_seqs, width), np.int32)
    page_indices[:num_reqs] = batch.block_table[slots, :width]
    padded_kv_lens = np.zeros(padded_seqs, np.int32)
    padded_kv_lens[:num_reqs] = kv_lens
    query_start_loc = np.full(padded_seqs + 1, num_tokens, np.int32)
    query_start_loc[0] = 0
    query_start_loc[1 : num_reqs + 1] = cu_query
    logits_indices = np.zeros(padded_seqs, np.int32)
    logits_indices[:num_reqs] = cu_query - 1

    step = StepInputs(
        input_ids=input_ids,
        positions=padded_positions,
        attention=AttentionMetadata(
            slot_mapping=slot_mapping,
            kv_lens=padded_kv_lens,
            page_indices=page_indices,
            query_start_loc=query_start_loc,
            num_seqs=np.asarray([num_reqs], np.int32),
        ),
        logits_indices=logits_indices,
    )
    host = HostStep(
        req_ids=list(req_ids),
        slots=slots,
        completes_prompt=kv_lens >= batch.num_tokens[slots],
        padded_num_seqs=padded_seqs,
    )
    return jax.device_put(step), host


def merge_plan(
    step: StepInputs,
    host: HostStep,
    batch: InputBatch,
    num_scheduled: list[int],
    unresolved: dict[str, tuple[int, int]],
    prev_tokens: jax.Array,
) -> StepInputs:
    """Adds the async merge fields: which tokens of ``step`` are still on the device.

    ``unresolved`` maps a request to (slot, position) of the token the previous, unresolved
    step sampled for it; where this step schedules that position, the token's index in the
    packed step goes to ``merge_dst`` and the slot to ``merge_src``.
    """
    padded_tokens, padded_seqs = step.input_ids.shape[0], host.padded_num_seqs
    dst = np.full(padded_seqs, padded_tokens, np.int32)
    src = np.zeros(padded_seqs, np.int32)
    if unresolved:
        query_lens = np.asarray(num_scheduled, np.int32)
        query_start = np.cumsum(query_lens) - query_lens
        for i, req_id in enumerate(host.req_ids):
            pending = unresolved.get(req_id)
            slot = int(host.slots[i])
            if pending is None or pending[0] != slot:
                continue
            offset = pending[1] - int(batch.num_computed_tokens[slot])
            if 0 <= offset < query_lens[i]:
                dst[i], src[i] = query_start[i] + offset, slot
    return step._replace(
        prev_tokens=prev_tokens, merge_dst=jax.device_put(dst), merge_src=jax.device_put(src)
    )


def merge_prev_tokens(step: StepInputs) -> StepInputs:
    """Inside the jitted forward: the previous step's sampled tokens into ``input_ids``."""
    if step.merge_dst is None:
        return step
    tokens = step.prev_tokens[step.merge_src]
    return step._replace(input_ids=step.input_ids.at[step.merge_dst].set(tokens, mode="drop"))
