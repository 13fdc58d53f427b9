"""Speculative decoding with vLLM's n-gram proposer: drafts verified in the step's one forward.

vLLM's scheduler sends a request's draft tokens in ``SchedulerOutput.scheduled_spec_decode_tokens``
and schedules them after the request's last sampled token, so a request with ``k`` drafts has
``1 + k`` new tokens this step. The runner:

* writes the drafts into the batch's token rows just past ``num_tokens`` (not counted), so
  :func:`~tpu_plugin.runner.inputs.prepare_inputs` packs them like any scheduled token;
* asks the forward pass for logits at every draft position as well: the step's sampling rows
  ``[0, S)`` (one per request) move to the position after the request's last usable draft (the
  bonus position), and one row per usable draft is appended at the end of ``logits_indices``,
  packed request after request (:func:`pack_drafts`) and padded to a power of two, so a spec
  step adds at most log2(S x K) + 1 forward programs per bucket, never one per draft layout;
* samples the bonus tokens with the ordinary sampler (every sampling parameter) and verifies the
  drafts with :func:`verify_drafts`, one jitted batched function, by vLLM's rules
  (``vllm/v1/sample/rejection_sampler.py``, without draft probabilities as for n-gram): a greedy
  row accepts drafts while they equal the target argmax and then emits the target's token; a
  random row accepts draft ``d`` when ``p(d) >= u`` (``p`` the target distribution after
  temperature and top-k/top-p, ``u`` uniform) and on the first rejection emits a token drawn
  from ``p`` with ``d`` removed; a row that accepts every draft emits its bonus token;
* after the host bookkeeping, proposes the next drafts with vLLM's ``NgramProposer`` (numba)
  over the batch's token rows; the engine collects them through ``take_draft_token_ids``.

Drafts are proposed only for requests whose sampling the verification implements exactly:
none of penalties, bad words, allowed token ids, an unfinished ``min_tokens``, structured
output, logprobs, ``min_p`` or logit bias (vLLM rejects the last two with drafts anyway). The
others decode one token a step in the same batch, with every feature, so their output is what
it would be without speculation. vLLM pads drafts with -1 (a resumed request, a grammar-invalid
draft): the drafts from the first -1 on are treated as absent, which is what vLLM's rules give
for them (the position's token is sampled from the target).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import DraftTokenIds

from tpu_plugin.runner.input_batch import InputBatch
from tpu_plugin.runner.inputs import HostStep, StepInputs
from tpu_plugin.runner.sampler import SamplingInputs, sampling_distribution

logger = init_logger(__name__)

# Folded into a request's sampling key so draft verification draws from its own stream.
SPEC_STREAM = 0x5EC0DE


class PackedDrafts(NamedTuple):
    """Where each usable draft's logits row is: drafts packed request after request.

    Only usable drafts get a logits row (computing the vocabulary projection for every
    ``S x K`` slot cost more than the accepted tokens saved on a CPU); the row count is padded
    to a power of two, so it takes few distinct values.
    """

    row_req: np.ndarray  # [P] int32: the request (step row) of each packed row
    row_pos: np.ndarray  # [P] int32: the draft index within its request
    gather: np.ndarray  # [S, K] int32: the packed row of draft j of request i, P if none


def pack_drafts(num_drafts: np.ndarray, k: int) -> PackedDrafts:
    """Packs ``num_drafts[i]`` drafts of each row ``i`` (at least one padded row)."""
    total = int(num_drafts.sum())
    padded = 1 << max(total - 1, 0).bit_length()
    row_req = np.zeros(padded, np.int32)
    row_pos = np.zeros(padded, np.int32)
    row_req[:total] = np.repeat(np.arange(len(num_drafts), dtype=np.int32), num_drafts)
    starts = np.cumsum(num_drafts) - num_drafts
    row_pos[:total] = np.arange(total, dtype=np.int32) - np.repeat(starts, num_drafts)
    position = np.arange(k, dtype=np.int32)[None, :]
    gather = np.where(position < num_drafts[:, None], starts[:, None] + position, padded)
    return PackedDrafts(row_req, row_pos, gather.astype(np.int32))


class SpecPlan(NamedTuple):
    """The drafts of one step, in the step's request order (host arrays)."""

    drafts: np.ndarray  # [S, K] int32: the usable drafts of each row, -1 after them
    num_drafts: np.ndarray  # [S] int32: usable drafts (leading non-negative ones)
    packed: PackedDrafts
    num_rows: int  # logits rows appended for the drafts (0 without any usable draft)
    blocks: dict[str, tuple[int, int]]  # request -> (scheduled drafts, usable drafts)

    def grammar_rows(self, structured_ids: list[str]) -> np.ndarray:
        """Each structured request's sampling row in vLLM's grammar bitmask.

        With drafts the scheduler's bitmask holds ``1 + scheduled drafts`` rows per request
        (in ``structured_ids`` order): one per draft position, then the bonus position.
        """
        rows, offset = [], 0
        for req_id in structured_ids:
            scheduled, usable = self.blocks.get(req_id, (0, 0))
            rows.append(offset + usable)
            offset += 1 + scheduled
        return np.asarray(rows, np.int64)


@partial(jax.jit, static_argnames=("all_greedy", "use_top_k_top_p"))
def verify_drafts(
    draft_logits: jax.Array,
    drafts: jax.Array,
    num_drafts: jax.Array,
    packed: PackedDrafts,
    bonus: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    draws: jax.Array,
    *,
    all_greedy: bool,
    use_top_k_top_p: bool,
) -> jax.Array:
    """vLLM's rejection rules for drafts without draft probabilities, batched over rows.

    ``draft_logits`` ``[P, V]``: the target's logits at each usable draft, packed as
    ``packed`` says. Every draft is judged on its own row (accept or not, and the token the
    target emits there); the first rejection of each request then decides its output. Returns
    ``[S, K + 1]`` output tokens: the accepted drafts, then the target's token at the first
    rejected draft or ``bonus`` when all were accepted, then -1.
    """
    rows, k = drafts.shape
    logits = draft_logits.astype(jnp.float32)
    row_draft = jnp.take(drafts.reshape(-1), packed.row_req * k + packed.row_pos)
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if all_greedy:
        accept_row, target_row = argmax == row_draft, argmax
    else:
        is_greedy, scaled = sampling_distribution(
            logits,
            temperature[packed.row_req],
            top_k[packed.row_req],
            top_p[packed.row_req],
            use_top_k_top_p=use_top_k_top_p,
        )
        probs = jax.nn.softmax(scaled, axis=-1)
        safe = jnp.maximum(row_draft, 0)
        p_draft = jnp.take_along_axis(probs, safe[:, None], axis=-1)[:, 0]
        # Without the draft token: what a rejected position draws from (vLLM's recovered token).
        without = jnp.where(jnp.arange(logits.shape[-1]) == safe[:, None], -jnp.inf, scaled)

        def draw(seed: jax.Array, index: jax.Array, pos: jax.Array, row: jax.Array) -> Any:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), SPEC_STREAM)
            key_u, key_r = jax.random.split(jax.random.fold_in(key, pos))
            return jax.random.uniform(key_u), jax.random.categorical(key_r, row)

        uniform, recovered = jax.vmap(draw)(
            seeds[packed.row_req], draws[packed.row_req], packed.row_pos, without
        )
        # p > 0 as well: a zero-probability draft is never accepted, even when u rounds to 0.
        accept_random = (row_draft >= 0) & (p_draft > 0) & (p_draft >= uniform)
        accept_row = jnp.where(is_greedy, argmax == row_draft, accept_random)
        target_row = jnp.where(is_greedy, argmax, recovered.astype(jnp.int32))
    accept = jnp.take(accept_row, packed.gather, mode="fill", fill_value=False)
    target = jnp.take(target_row, packed.gather, mode="fill", fill_value=0)
    usable = jnp.arange(k)[None, :] < num_drafts[:, None]
    accepted = jnp.sum(jnp.cumprod(accept & usable, axis=1), axis=1).astype(jnp.int32)
    at_rejection = jnp.take_along_axis(target, jnp.minimum(accepted, k - 1)[:, None], axis=1)
    final = jnp.where(accepted < num_drafts, at_rejection[:, 0], bonus[:rows])
    column = jnp.arange(k + 1)[None, :]
    padded_drafts = jnp.concatenate([drafts, jnp.zeros((rows, 1), jnp.int32)], axis=1)
    return jnp.where(
        column < accepted[:, None],
        padded_drafts,
        jnp.where(column == accepted[:, None], final[:, None], -1),
    ).astype(jnp.int32)


def draftable(batch: InputBatch, slots: np.ndarray) -> np.ndarray:
    """Rows whose sampling :func:`verify_drafts` reproduces exactly (see the module doc)."""
    generated = batch.num_tokens[slots] - batch.num_prompt_tokens[slots]
    return (
        (batch.presence_penalty[slots] == 0)
        & (batch.frequency_penalty[slots] == 0)
        & (batch.repetition_penalty[slots] == 1)
        & (batch.bad_words.lengths[slots] == 0)
        & (batch.allowed_ids.lengths[slots] == 0)
        & (batch.bias_ids.lengths[slots] == 0)
        & (batch.logprob_ids.lengths[slots] == 0)
        & (batch.min_p[slots] == 0)
        & (generated >= batch.min_tokens[slots])
        & ~batch.structured[slots]
        & (batch.num_logprobs[slots] < 0)
    )


class SpecDecoder:
    """Per-runner state of n-gram speculation: the proposer and the drafts it last made."""

    def __init__(self, vllm_config: VllmConfig):
        spec = vllm_config.speculative_config
        assert spec is not None and spec.method == "ngram"
        try:
            from vllm.v1.spec_decode.ngram_proposer import NgramProposer
        except ImportError as error:  # numba
            raise ValueError(
                f"the n-gram proposer needs numba ({error}); pip install numba==0.68.1"
            ) from None
        self.k = int(spec.num_speculative_tokens)
        self.proposer = NgramProposer(vllm_config)
        self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        self._drafts: DraftTokenIds | None = None
        logger.info(
            "speculative decoding: n-gram proposer, %d draft tokens, n-grams of %d..%d",
            self.k,
            spec.prompt_lookup_min,
            spec.prompt_lookup_max,
        )

    # ---- before the forward ---------------------------------------------------------------
    def write_drafts(self, batch: InputBatch, so: SchedulerOutput) -> None:
        """Puts each scheduled draft after its request's tokens (-1 padding as token 0)."""
        for req_id, drafts in so.scheduled_spec_decode_tokens.items():
            slot = batch.req_id_to_slot.get(req_id)
            if slot is None or not drafts:
                continue
            start = int(batch.num_tokens[slot])
            batch.token_ids[slot, start : start + len(drafts)] = np.maximum(drafts, 0)

    def add_rows(
        self, step: StepInputs, host: HostStep, so: SchedulerOutput
    ) -> tuple[StepInputs, SpecPlan | None]:
        """Moves the sampling rows to the bonus positions and appends the draft rows."""
        spec_tokens = so.scheduled_spec_decode_tokens
        if not spec_tokens:
            return step, None
        rows, k = host.padded_num_seqs, self.k
        num_reqs = len(host.req_ids)
        query_lens = np.fromiter((so.num_scheduled_tokens[r] for r in host.req_ids), np.int32)
        ends = np.cumsum(query_lens, dtype=np.int32)  # one past each request's last token
        drafts = np.full((rows, k), -1, np.int32)
        scheduled = np.zeros(rows, np.int32)
        for i, req_id in enumerate(host.req_ids):
            tokens = spec_tokens.get(req_id)
            if tokens:
                scheduled[i] = len(tokens)
                drafts[i, : len(tokens)] = tokens
        usable = np.cumprod(drafts >= 0, axis=1).sum(axis=1).astype(np.int32)
        drafts[np.arange(k)[None, :] >= usable[:, None]] = -1
        # Position of the first scheduled draft's target row: the token before it.
        first = np.zeros(rows, np.int32)
        first[:num_reqs] = ends - 1 - scheduled[:num_reqs]
        sample_rows = np.zeros(rows, np.int32)
        sample_rows[:num_reqs] = first[:num_reqs] + usable[:num_reqs]
        pieces = [jax.device_put(sample_rows)]
        if step.logits_indices.shape[0] > rows:  # prompt-logprob rows stay where they are
            pieces.append(step.logits_indices[rows:])
        packed = pack_drafts(usable, k)
        num_rows = 0
        if usable.max(initial=0) > 0:
            draft_rows = first[packed.row_req] + packed.row_pos
            draft_rows[int(usable.sum()) :] = 0
            pieces.append(jax.device_put(draft_rows.astype(np.int32)))
            num_rows = len(draft_rows)
        blocks = {
            req_id: (len(spec_tokens.get(req_id, ())), int(usable[i]))
            for i, req_id in enumerate(host.req_ids)
        }
        step = step._replace(logits_indices=jnp.concatenate(pieces))
        return step, SpecPlan(drafts, usable, packed, num_rows, blocks)

    # ---- after the forward ----------------------------------------------------------------
    def verify(
        self,
        logits: jax.Array,
        bonus: jax.Array,
        plan: SpecPlan,
        params: SamplingInputs,
        flags: dict[str, Any],
    ) -> jax.Array:
        """The step's output tokens ``[S, K + 1]`` (-1 padded), still on the device.

        ``params``: the step's sampling inputs, already on the device (the sampler's).
        """
        return verify_drafts(
            logits[logits.shape[0] - plan.num_rows :],
            jax.device_put(plan.drafts),
            jax.device_put(plan.num_drafts),
            jax.device_put(plan.packed),
            bonus,
            params.temperature,
            params.top_k,
            params.top_p,
            params.seeds,
            params.draws,
            all_greedy=flags["all_greedy"],
            use_top_k_top_p=flags["use_top_k_top_p"],
        )

    @staticmethod
    def tokens_to_host(tokens: jax.Array, num_reqs: int) -> list[list[int]]:
        out = np.asarray(jax.device_get(tokens))[:num_reqs]
        return [row[row >= 0].tolist() for row in out]

    def propose(self, batch: InputBatch, host: HostStep, sampled: list[list[int]]) -> None:
        """Drafts for the next step from each request's tokens (the step's are appended)."""
        by_slot: list[list[int]] = [[] for _ in range(self.max_num_seqs)]
        wanted = draftable(batch, host.slots)
        req_of_slot = {}
        for i, req_id in enumerate(host.req_ids):
            slot = int(host.slots[i])
            if sampled[i] and wanted[i] and batch.req_id_to_slot.get(req_id) == slot:
                by_slot[slot] = sampled[i]
                req_of_slot[slot] = req_id
        if not req_of_slot:
            self._drafts = None
            return
        drafts = self.proposer.propose(self.k, by_slot, batch.num_tokens, batch.token_ids)
        slots = sorted(req_of_slot)
        self._drafts = DraftTokenIds([req_of_slot[s] for s in slots], [drafts[s] for s in slots])

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        drafts, self._drafts = self._drafts, None
        return drafts
