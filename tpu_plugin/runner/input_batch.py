"""The persistent input batch: request state kept across steps in slot-indexed host arrays.

vLLM's scheduler sends only what changed each step (new requests, new blocks, finished ids);
the runner keeps everything else here. Requests hold a slot while they are scheduled; a
request the scheduler pauses (preemption) leaves the batch but keeps its :class:`RequestState`,
so it can come back with its prompt and outputs intact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from vllm.sampling_params import SamplingParams


@dataclass
class RequestState:
    """What the runner remembers of one request while it lives."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    output_token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


class InputBatch:
    """Host arrays, one row per slot, for the requests currently in the batch."""

    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int):
        self.max_num_reqs = max_num_reqs
        self.token_ids = np.zeros((max_num_reqs, max_model_len), np.int32)
        self.num_tokens = np.zeros(max_num_reqs, np.int32)
        self.num_prompt_tokens = np.zeros(max_num_reqs, np.int32)
        self.num_computed_tokens = np.zeros(max_num_reqs, np.int32)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), np.int32)
        self.num_blocks = np.zeros(max_num_reqs, np.int32)
        # Sampling parameters per slot, gathered by slot each step (no per-request loop).
        self.temperature = np.zeros(max_num_reqs, np.float32)
        self.top_k = np.zeros(max_num_reqs, np.int32)
        self.top_p = np.ones(max_num_reqs, np.float32)
        self.seed = np.full(max_num_reqs, -1, np.int64)  # -1: no per-request seed
        self.num_logprobs = np.full(max_num_reqs, -1, np.int32)  # -1: no logprobs
        self.req_id_to_slot: dict[str, int] = {}
        self.slot_to_state: dict[int, RequestState] = {}
        self._free_slots = list(range(max_num_reqs - 1, -1, -1))

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.req_id_to_slot

    def add(self, state: RequestState) -> int:
        """Copies ``state`` into a free slot and returns the slot."""
        if not self._free_slots:
            raise RuntimeError(f"more than {self.max_num_reqs} requests scheduled at once")
        slot = self._free_slots.pop()
        self.req_id_to_slot[state.req_id] = slot
        self.slot_to_state[slot] = state
        tokens = state.prompt_token_ids + state.output_token_ids
        self.token_ids[slot, : len(tokens)] = tokens
        self.num_tokens[slot] = len(tokens)
        self.num_prompt_tokens[slot] = len(state.prompt_token_ids)
        self.num_computed_tokens[slot] = state.num_computed_tokens
        self.set_blocks(slot, state.block_ids)
        params = state.sampling_params
        self.temperature[slot] = params.temperature
        self.top_k[slot] = max(params.top_k or 0, 0)
        self.top_p[slot] = params.top_p
        self.seed[slot] = -1 if params.seed is None else params.seed
        self.num_logprobs[slot] = -1 if params.logprobs is None else params.logprobs
        return slot

    def remove(self, req_id: str) -> None:
        slot = self.req_id_to_slot.pop(req_id, None)
        if slot is not None:
            del self.slot_to_state[slot]
            self._free_slots.append(slot)

    def set_blocks(self, slot: int, block_ids: list[int]) -> None:
        self.block_table[slot, : len(block_ids)] = block_ids
        self.num_blocks[slot] = len(block_ids)

    def append_blocks(self, slot: int, block_ids: list[int]) -> None:
        start = int(self.num_blocks[slot])
        self.block_table[slot, start : start + len(block_ids)] = block_ids
        self.num_blocks[slot] = start + len(block_ids)

    def append_token(self, slot: int, token_id: int) -> None:
        self.token_ids[slot, self.num_tokens[slot]] = token_id
        self.num_tokens[slot] += 1

    def truncate_outputs(self, slot: int, num_output_tokens: int) -> None:
        """Drops output tokens the scheduler discarded (rejected drafts)."""
        self.num_tokens[slot] = self.num_prompt_tokens[slot] + num_output_tokens
