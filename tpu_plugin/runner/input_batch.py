"""The persistent input batch: request state kept across steps in slot-indexed host arrays.

vLLM's scheduler sends only what changed each step (new requests, new blocks, finished ids);
the runner keeps everything else here. Requests hold a slot while they are scheduled; a
request the scheduler pauses (preemption) leaves the batch but keeps its :class:`RequestState`,
so it can come back with its prompt and outputs intact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vllm.pooling_params import PoolingParams
from vllm.sampling_params import SamplingParams


@dataclass
class RequestState:
    """What the runner remembers of one request while it lives."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None  # None for pooling requests
    block_ids: list[int]
    num_computed_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    pooling_params: PoolingParams | None = None
    # Prompt logprobs filled chunk by chunk ([token, top-k] ids, scores, ranks), sent once the
    # prompt is complete; ``prompt_logprobs_sent`` keeps a recomputed prompt from sending twice.
    prompt_logprobs_rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    prompt_logprobs_sent: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


def bucket(n: int) -> int:
    """Widths of per-request lists grow in powers of two (few distinct compiled shapes)."""
    return 1 << max(int(n) - 1, 0).bit_length()


class SlotLists:
    """One variable-length list per slot, kept as a padded ``[slots, width, *item]`` array.

    ``gather`` returns the rows of a step without a per-request loop, cut to the bucketed
    longest list among them; the width grows (doubling) when a longer list arrives. With
    ``item``, every list entry is itself a row (bad words), right-aligned: rows widen on the
    left, so the last column stays each word's last token.
    """

    def __init__(self, max_num_reqs: int, fill: int | float, dtype: Any, item: int = 0):
        self.fill, self.item = fill, item
        self.values = np.full((max_num_reqs, 1, *((item,) if item else ())), fill, dtype)
        self.lengths = np.zeros(max_num_reqs, np.int32)

    def set(self, slot: int, values: np.ndarray) -> None:
        n = len(values)
        if n > self.values.shape[1]:
            extra = bucket(n) - self.values.shape[1]
            pad = [(0, 0), (0, extra)] + ([(0, 0)] if self.item else [])
            self.values = np.pad(self.values, pad, constant_values=self.fill)
        if self.item and n:
            width = max(values.shape[1], self.values.shape[2])
            grow = [(0, 0), (0, 0), (width - self.values.shape[2], 0)]
            self.values = np.pad(self.values, grow, constant_values=self.fill)
            values = np.pad(
                values, [(0, 0), (width - values.shape[1], 0)], constant_values=self.fill
            )
        self.values[slot] = self.fill
        if n:
            self.values[slot, :n] = values
        self.lengths[slot] = n

    def any(self, slots: np.ndarray) -> bool:
        return bool(self.lengths[slots].max(initial=0) > 0)

    def gather(self, slots: np.ndarray, padded_rows: int) -> np.ndarray:
        width = bucket(self.lengths[slots].max(initial=1))
        out = np.full((padded_rows, width, *self.values.shape[2:]), self.fill, self.values.dtype)
        out[: len(slots)] = self.values[slots, :width]
        return out


def bad_word_rows(words: list[list[int]]) -> np.ndarray:
    """Bad words right-aligned in rows of the bucketed longest word: -1 before a word starts."""
    width = bucket(max(len(w) for w in words))
    rows = np.full((len(words), width), -1, np.int32)
    for i, word in enumerate(words):
        rows[i, width - len(word) :] = word
    return rows


class InputBatch:
    """Host arrays, one row per slot, for the requests currently in the batch."""

    def __init__(
        self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int, vocab_size: int = 0
    ):
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
        self.num_prompt_logprobs = np.full(max_num_reqs, -1, np.int32)  # -1: none (left)
        self.min_p = np.zeros(max_num_reqs, np.float32)
        self.presence_penalty = np.zeros(max_num_reqs, np.float32)
        self.frequency_penalty = np.zeros(max_num_reqs, np.float32)
        self.repetition_penalty = np.ones(max_num_reqs, np.float32)
        self.min_tokens = np.zeros(max_num_reqs, np.int32)
        self.structured = np.zeros(max_num_reqs, bool)
        # Per-slot lists; padding is the vocabulary size, an id no scatter writes.
        self.vocab_size = vocab_size
        self.bias_ids = SlotLists(max_num_reqs, vocab_size, np.int32)
        self.bias = SlotLists(max_num_reqs, 0.0, np.float32)
        self.allowed_ids = SlotLists(max_num_reqs, vocab_size, np.int32)
        self.stop_ids = SlotLists(max_num_reqs, vocab_size, np.int32)
        self.bad_words = SlotLists(max_num_reqs, -1, np.int32, item=1)
        self.logprob_ids = SlotLists(max_num_reqs, -1, np.int32)
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
        if params is None:  # pooling: an engine serves pooling or generation, never both
            return slot
        self.temperature[slot] = params.temperature
        self.top_k[slot] = max(params.top_k or 0, 0)
        self.top_p[slot] = params.top_p
        self.seed[slot] = -1 if params.seed is None else params.seed
        all_vocab = self.vocab_size
        self.num_logprobs[slot] = -1 if params.logprobs is None else params.logprobs
        if params.logprobs == -1:
            self.num_logprobs[slot] = all_vocab
        chosen = getattr(params, "logprob_token_ids", None) or []
        if chosen and params.logprobs is None:
            self.num_logprobs[slot] = len(chosen)  # vLLM's SamplingParams.num_logprobs
        self.logprob_ids.set(slot, np.asarray(chosen, np.int32))
        wants_prompt = params.prompt_logprobs is not None and not state.prompt_logprobs_sent
        self.num_prompt_logprobs[slot] = -1
        if wants_prompt:
            k = params.prompt_logprobs
            self.num_prompt_logprobs[slot] = all_vocab if k == -1 else k
        self._add_processors(slot, params)
        return slot

    def _add_processors(self, slot: int, params: SamplingParams) -> None:
        """The parameters vLLM implements as logits processors and penalties."""
        vocab = self.vocab_size
        self.min_p[slot] = params.min_p
        self.presence_penalty[slot] = params.presence_penalty
        self.frequency_penalty[slot] = params.frequency_penalty
        self.repetition_penalty[slot] = params.repetition_penalty
        self.min_tokens[slot] = params.min_tokens
        self.structured[slot] = params.structured_outputs is not None
        bias = {t: b for t, b in (params.logit_bias or {}).items() if 0 <= t < vocab}
        self.bias_ids.set(slot, np.fromiter(bias.keys(), np.int32, len(bias)))
        self.bias.set(slot, np.fromiter(bias.values(), np.float32, len(bias)))
        self.allowed_ids.set(slot, np.asarray(params.allowed_token_ids or [], np.int32))
        stops = sorted(params.all_stop_token_ids) if params.min_tokens else []
        self.stop_ids.set(slot, np.asarray(stops, np.int32))
        words = params.bad_words_token_ids or []
        self.bad_words.set(slot, bad_word_rows(words) if words else np.zeros((0, 1), np.int32))

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

    def processor_inputs(self, slots: np.ndarray, padded_rows: int) -> dict[str, Any]:
        """The optional :class:`~tpu_plugin.runner.sampler.SamplingInputs` fields of a step.

        A feature no row of the step uses stays absent (``None`` in the sampler), so its work
        is not compiled in. Everything is gathered by slot with NumPy; the only loops are in
        :meth:`SlotLists.set`, at admission.
        """
        from tpu_plugin.runner.sampler import Penalties

        rows, vocab = len(slots), self.vocab_size

        def pad(values: np.ndarray, fill: float | int) -> np.ndarray:
            out = np.full((padded_rows, *values.shape[1:]), fill, values.dtype)
            out[:rows] = values
            return out

        out: dict[str, Any] = {}
        num_tokens, num_prompt = self.num_tokens[slots], self.num_prompt_tokens[slots]
        if np.any(self.min_p[slots] > 0):
            out["min_p"] = pad(self.min_p[slots], 0.0)
        presence, frequency = self.presence_penalty[slots], self.frequency_penalty[slots]
        repetition = self.repetition_penalty[slots]
        penalized = (presence != 0) | (frequency != 0) | (repetition != 1)
        if np.any(penalized):
            width = min(bucket(num_tokens[penalized].max()), self.token_ids.shape[1])
            position = np.arange(width)[None, :]
            tokens = np.where(
                penalized[:, None] & (position < num_tokens[:, None]),
                self.token_ids[slots, :width],
                vocab,
            )
            out["penalties"] = Penalties(
                tokens=pad(tokens, vocab),
                num_prompt=pad(num_prompt, 0),
                num_tokens=pad(num_tokens, 0),
                presence=pad(presence, 0.0),
                frequency=pad(frequency, 0.0),
                repetition=pad(repetition, 1.0),
            )
        if self.bias_ids.any(slots):
            out["bias_ids"] = self.bias_ids.gather(slots, padded_rows)
            out["bias"] = self.bias.gather(slots, padded_rows)
        if self.allowed_ids.any(slots):
            out["allowed_ids"] = self.allowed_ids.gather(slots, padded_rows)
        if self.bad_words.any(slots):
            words = self.bad_words.gather(slots, padded_rows)
            # The output's last (word width - 1) tokens; -2 (matches nothing) before its start.
            position = num_tokens[:, None] - words.shape[2] + 1 + np.arange(words.shape[2] - 1)
            history = self.token_ids[slots[:, None], np.maximum(position, 0)]
            out["bad_words"] = words
            out["bad_words_history"] = pad(
                np.where(position >= num_prompt[:, None], history, -2).astype(np.int32), -2
            )
        if self.logprob_ids.any(slots):
            out["logprob_ids"] = self.logprob_ids.gather(slots, padded_rows)
        active = (num_tokens - num_prompt) < self.min_tokens[slots]
        if np.any(active) and self.stop_ids.any(slots[active]):
            stops = self.stop_ids.gather(slots, padded_rows)
            stops[:rows][~active] = vocab
            out["stop_ids"] = stops
            out["stop_restore"] = pad(self.structured[slots], False)
        return out
