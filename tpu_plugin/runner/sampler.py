"""The jitted sampler: every ``SamplingParams`` field of vLLM's v1 sampler, batched over rows.

Order of operations is vLLM's (``vllm/v1/sample/sampler.py``): the grammar bitmask first (vLLM's
runner applies it before its sampler), then raw logprobs, allowed token ids, bad words,
min-tokens, logit bias, penalties; greedy rows take the argmax of those logits; sampled rows
are divided by their temperature, then min-p, top-k and top-p mask them before the draw.
Temperature below 1e-5 is greedy; ``top_k`` <= 0 (or >= vocab) and ``top_p`` == 1 are off.
Logprobs follow ``--logprobs-mode`` (default ``raw_logprobs``: log-softmax of the model's
logits after the grammar mask), the sampled token first and its rank counted as vLLM does
(number of tokens at least as likely). A request with a seed draws from ``fold_in(key(seed),
n)`` where ``n`` is how many tokens it has generated, so its output does not depend on the
batch.

Optional features are ``None`` fields of :class:`SamplingInputs`; ``None`` is part of the jit
cache key, so a batch that uses none of them runs the cheap program. The two flags
``all_greedy`` and ``use_top_k_top_p`` are static (one program each way) or ``None``: decided
at run time from the rows by a ``lax.cond``, one program for both (the CPU's choice,
compile.runtime_sampler_flags).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tpu_plugin.runner import logits_processing as lp

GREEDY_EPS = 1e-5


class Penalties(NamedTuple):
    tokens: jax.Array  # [S, L] int32: each row's prompt then output token ids, padded
    num_prompt: jax.Array  # [S] int32
    num_tokens: jax.Array  # [S] int32
    presence: jax.Array  # [S] float32
    frequency: jax.Array  # [S] float32
    repetition: jax.Array  # [S] float32


class SamplingInputs(NamedTuple):
    """Per-row sampling parameters (padded rows are greedy and ignored)."""

    temperature: jax.Array  # [S] float32
    top_k: jax.Array  # [S] int32, 0 = off
    top_p: jax.Array  # [S] float32, 1 = off
    seeds: jax.Array  # [S] uint32
    draws: jax.Array  # [S] int32: index of this draw within the request
    # [S] bool: rows that asked for logprobs, where the program decides at run time whether to
    # compute them (None: the static ``num_logprobs`` decides alone).
    want_logprobs: jax.Array | None = None
    min_p: jax.Array | None = None  # [S] float32, 0 = off
    penalties: Penalties | None = None
    bias_ids: jax.Array | None = None  # [S, B] int32 (padding = vocab)
    bias: jax.Array | None = None  # [S, B] float32
    allowed_ids: jax.Array | None = None  # [S, A] int32 (padding = vocab; none = all allowed)
    bad_words: jax.Array | None = None  # [S, W, L] int32, see logits_processing.apply_bad_words
    bad_words_history: jax.Array | None = None  # [S, L - 1] int32
    stop_ids: jax.Array | None = None  # [S, M] int32: stop tokens masked for min_tokens
    stop_restore: jax.Array | None = None  # [S] bool: structured-output rows
    bitmask: jax.Array | None = None  # [S, ceil(V/32)] int32 grammar bitmask (-1 = free)
    logprob_ids: jax.Array | None = None  # [S, T] int32: logprob_token_ids (-1 = padding)


class SampledTokens(NamedTuple):
    token_ids: jax.Array  # [S] int32
    topk_ids: jax.Array | None  # [S, K] int32
    topk_logprobs: jax.Array | None  # [S, K] float32
    sampled_logprob: jax.Array | None  # [S] float32
    sampled_rank: jax.Array | None  # [S] int32


def process_logits(logits: jax.Array, p: SamplingInputs) -> jax.Array:
    """The processors that can change the argmax, in vLLM's order (after the bitmask)."""
    if p.allowed_ids is not None:
        logits = lp.apply_allowed_ids(logits, p.allowed_ids)
    if p.bad_words is not None:
        logits = lp.apply_bad_words(logits, p.bad_words, p.bad_words_history)
    if p.stop_ids is not None:
        logits = lp.apply_min_tokens(logits, p.stop_ids, p.stop_restore)
    if p.bias_ids is not None:
        logits = lp.apply_logit_bias(logits, p.bias_ids, p.bias)
    if p.penalties is not None:
        logits = lp.apply_penalties(logits, *p.penalties)
    return logits


def sampling_distribution(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    use_top_k_top_p: bool | None,
    min_p: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(is_greedy, scaled)``: the logits a random row draws from, in vLLM's order
    (temperature, min-p, top-k/top-p); greedy rows keep temperature 1 and are flagged.

    Shared by :func:`sample` and speculative verification (spec_decode.py), which must judge
    a draft against exactly the distribution the sampler would draw from.
    """
    is_greedy = temperature < GREEDY_EPS
    scaled = logits / jnp.where(is_greedy, 1.0, temperature)[:, None]
    if min_p is not None:
        scaled = lp.apply_min_p(scaled, min_p)
    if use_top_k_top_p is None:  # decided by the rows: the sort over the vocabulary only if used
        used = jnp.any(top_k > 0) | jnp.any(top_p < 1.0)
        scaled = jax.lax.cond(
            used, lambda: lp.mask_top_k_top_p(scaled, top_k, top_p), lambda: scaled
        )
    elif use_top_k_top_p:
        scaled = lp.mask_top_k_top_p(scaled, top_k, top_p)
    return is_greedy, scaled


@partial(
    jax.jit, static_argnames=("all_greedy", "use_top_k_top_p", "num_logprobs", "logprobs_mode")
)
def sample(
    logits: jax.Array,
    params: SamplingInputs,
    *,
    all_greedy: bool | None,
    use_top_k_top_p: bool | None,
    num_logprobs: int,
    logprobs_mode: str = "raw_logprobs",
) -> SampledTokens:
    """Samples one token per row of ``logits`` ``[>=S, vocab]`` (rows past S are ignored).

    ``all_greedy`` / ``use_top_k_top_p`` ``None``: decided from the rows at run time; with
    ``params.want_logprobs``, logprobs are computed (``num_logprobs`` wide) only when a row
    asks for them and are zeros otherwise.
    """
    logits = logits[: params.temperature.shape[0]].astype(jnp.float32)
    if params.bitmask is not None:
        logits = lp.apply_bitmask(logits, params.bitmask)
    raw = logits
    logits = process_logits(logits, params)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw_tokens() -> tuple[jax.Array, jax.Array]:
        is_greedy, scaled = sampling_distribution(
            logits,
            params.temperature,
            params.top_k,
            params.top_p,
            use_top_k_top_p=use_top_k_top_p,
            min_p=params.min_p,
        )

        def draw(seed: jax.Array, index: jax.Array, row: jax.Array) -> jax.Array:
            key = jax.random.fold_in(jax.random.key(seed), index)
            return jax.random.categorical(key, row)

        random_tokens = jax.vmap(draw)(params.seeds, params.draws, scaled).astype(jnp.int32)
        return jnp.where(is_greedy, greedy_tokens, random_tokens), scaled

    if all_greedy is None:  # no draw when every row is greedy (padding rows are)
        every_row_greedy = jnp.all(params.temperature < GREEDY_EPS)
        tokens, final = jax.lax.cond(every_row_greedy, lambda: (greedy_tokens, logits), draw_tokens)
    elif all_greedy:
        tokens, final = greedy_tokens, logits
    else:
        tokens, final = draw_tokens()

    if num_logprobs == 0:
        return SampledTokens(tokens, None, None, None, None)

    def logprobs() -> tuple[jax.Array, ...]:
        scores = {
            "raw_logprobs": lambda: jax.nn.log_softmax(raw, axis=-1),
            "raw_logits": lambda: raw,
            "processed_logprobs": lambda: jax.nn.log_softmax(final, axis=-1),
            "processed_logits": lambda: final,
        }[logprobs_mode]()
        ids, values, rank = lp.gather_logprobs(scores, tokens, num_logprobs)
        top_ids, top_values = ids[:, 1:], values[:, 1:]
        if params.logprob_ids is not None:  # rows with logprob_token_ids: those ids instead
            top_ids, top_values = lp.chosen_logprobs(
                scores, params.logprob_ids, top_ids, top_values
            )
        return top_ids, top_values, values[:, 0], rank

    if params.want_logprobs is None:
        return SampledTokens(tokens, *logprobs())
    shapes = jax.eval_shape(logprobs)
    return SampledTokens(
        tokens,
        *jax.lax.cond(
            jnp.any(params.want_logprobs),
            logprobs,
            lambda: tuple(jnp.zeros(x.shape, x.dtype) for x in shapes),
        ),
    )


@partial(jax.jit, static_argnames=("start", "num_logprobs", "logprobs_mode"))
def prompt_logprobs(
    logits: jax.Array, targets: jax.Array, *, start: int, num_logprobs: int, logprobs_mode: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Prompt positions' scores (rows ``start:`` of ``logits``) for their next prompt token.

    Prompt tokens skip every sampling processor, so the processed modes equal the raw ones
    (as in vLLM).
    """
    rows = logits[start:].astype(jnp.float32)
    if logprobs_mode in ("raw_logprobs", "processed_logprobs"):
        rows = jax.nn.log_softmax(rows, axis=-1)
    return lp.gather_logprobs(rows, targets, num_logprobs)


def to_host(sampled: SampledTokens, num_reqs: int) -> dict[str, np.ndarray | None]:
    """Copies the real rows back to the host in one transfer."""
    fetched = jax.device_get(sampled)
    return {
        name: (None if value is None else np.asarray(value)[:num_reqs])
        for name, value in fetched._asdict().items()
    }
