"""Prompt logprobs: logits for the prompt positions a step computes, chunk by chunk.

The forward pass computes logits only at the rows listed in ``StepInputs.logits_indices``; for
requests that asked for ``prompt_logprobs`` the runner appends the hidden-state rows of their
prompt positions after the sampling rows (so the model code does not change). Position ``p``'s
logits score prompt token ``p + 1``. With chunked prefill each step fills its slice of the
request's rows; they are sent once, in the step that completes the prompt, as vLLM's
``prompt_logprobs_dict`` expects. vLLM's scheduler does not read the prefix cache for these
requests, so every prompt position is computed here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from vllm.v1.outputs import LogprobsTensors

from tpu_plugin.runner.input_batch import InputBatch, RequestState, bucket
from tpu_plugin.runner.inputs import HostStep, StepInputs
from tpu_plugin.runner.sampler import prompt_logprobs


class PromptLogprobRows(NamedTuple):
    """Which extra logits rows belong to which request's prompt positions this step."""

    rows: list[int]  # indices into the step's requests
    spans: list[tuple[int, int, int]]  # (first position, end position, first extra row)
    targets: np.ndarray  # [P] int32: the next prompt token of each extra row (padded)
    num_logprobs: int  # top-k width computed this step (bucketed)


def add_prompt_logit_rows(
    step: StepInputs,
    host: HostStep,
    batch: InputBatch,
    num_scheduled: dict[str, int],
) -> tuple[StepInputs, PromptLogprobRows | None]:
    """Appends the prompt positions' hidden rows to ``step.logits_indices`` where needed."""
    wanted = np.nonzero(batch.num_prompt_logprobs[host.slots] >= 0)[0]
    if len(wanted) == 0:
        return step, None
    query_lens = np.fromiter((num_scheduled[r] for r in host.req_ids), np.int32)
    query_start = np.cumsum(query_lens) - query_lens
    indices, targets, spans = [], [], []
    for i in wanted.tolist():
        slot = int(host.slots[i])
        start = int(batch.num_computed_tokens[slot])
        end = min(start + int(query_lens[i]), int(batch.num_prompt_tokens[slot]) - 1)
        count = max(end - start, 0)
        spans.append((start, start + count, sum(len(x) for x in indices)))
        indices.append(query_start[i] + np.arange(count, dtype=np.int32))
        targets.append(batch.token_ids[slot, start + 1 : start + 1 + count])
    flat = np.concatenate(indices).astype(np.int32)
    padded = bucket(max(len(flat), 1))
    extra = np.zeros(padded, np.int32)
    extra[: len(flat)] = flat
    padded_targets = np.zeros(padded, np.int32)
    padded_targets[: len(flat)] = np.concatenate(targets)
    k = int(batch.num_prompt_logprobs[host.slots[wanted]].max())
    num_logprobs = min(bucket(max(k, 1)), batch.vocab_size)
    step = step._replace(
        logits_indices=jnp.concatenate([step.logits_indices, jax.device_put(extra)])
    )
    return step, PromptLogprobRows(wanted.tolist(), spans, padded_targets, num_logprobs)


def collect_prompt_logprobs(
    logits: jax.Array,
    plan: PromptLogprobRows,
    host: HostStep,
    batch: InputBatch,
    requests: dict[str, RequestState],
    logprobs_mode: str,
) -> dict[str, LogprobsTensors | None]:
    """Scores this step's prompt rows; returns the requests whose prompt is now complete."""
    ids, scores, ranks = jax.device_get(
        prompt_logprobs(
            logits,
            jnp.asarray(plan.targets),
            start=host.padded_num_seqs,
            num_logprobs=plan.num_logprobs,
            logprobs_mode=logprobs_mode,
        )
    )
    done: dict[str, LogprobsTensors | None] = {}
    for i, (start, end, first) in zip(plan.rows, plan.spans, strict=True):
        req_id, slot = host.req_ids[i], int(host.slots[i])
        state = requests[req_id]
        width = int(batch.num_prompt_logprobs[slot]) + 1
        if state.prompt_logprobs_rows is None:
            n = max(len(state.prompt_token_ids) - 1, 0)
            state.prompt_logprobs_rows = (
                np.zeros((n, width), np.int32),
                np.zeros((n, width), np.float32),
                np.zeros(n, np.int32),
            )
        out_ids, out_scores, out_ranks = state.prompt_logprobs_rows
        rows = slice(first, first + end - start)
        out_ids[start:end] = ids[rows, :width]
        out_scores[start:end] = scores[rows, :width]
        out_ranks[start:end] = ranks[rows]
        if host.completes_prompt[i]:
            done[req_id] = LogprobsTensors(
                torch.from_numpy(out_ids), torch.from_numpy(out_scores), torch.from_numpy(out_ranks)
            )
            state.prompt_logprobs_rows = None
            state.prompt_logprobs_sent = True
            batch.num_prompt_logprobs[slot] = -1
    return done
