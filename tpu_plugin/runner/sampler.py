"""The jitted sampler: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Semantics follow vLLM's ``SamplingParams``: temperature below 1e-5 is greedy; ``top_k`` <= 0
(or >= vocab) and ``top_p`` == 1 are off; logprobs are of the raw logits (vLLM's default
``raw_logprobs``), with the sampled token first and its rank counted as vLLM does (number of
tokens at least as likely). A request with a seed draws from ``fold_in(key(seed), n)`` where
``n`` is how many tokens it has generated, so its output does not depend on the batch.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

GREEDY_EPS = 1e-5


class SamplingInputs(NamedTuple):
    """Per-row sampling parameters (padded rows are greedy and ignored)."""

    temperature: jax.Array  # [S] float32
    top_k: jax.Array  # [S] int32, 0 = off
    top_p: jax.Array  # [S] float32, 1 = off
    seeds: jax.Array  # [S] uint32
    draws: jax.Array  # [S] int32: index of this draw within the request


class SampledTokens(NamedTuple):
    token_ids: jax.Array  # [S] int32
    topk_ids: jax.Array | None  # [S, K] int32
    topk_logprobs: jax.Array | None  # [S, K] float32
    sampled_logprob: jax.Array | None  # [S] float32
    sampled_rank: jax.Array | None  # [S] int32


def _mask_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sets logits outside each row's top-k and top-p nucleus to -inf (one sort per row)."""
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)
    kth_value = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    # Nucleus: keep the smallest prefix whose probability reaches top_p (the first always).
    probs = jax.nn.softmax(jnp.where(sorted_desc >= kth_value, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    in_nucleus = mass_before < top_p[:, None]
    last_kept = jnp.sum(in_nucleus, axis=-1) - 1
    cutoff = jnp.take_along_axis(sorted_desc, last_kept[:, None], axis=-1)
    cutoff = jnp.maximum(cutoff, kth_value)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


@partial(jax.jit, static_argnames=("all_greedy", "use_top_k_top_p", "num_logprobs"))
def sample(
    logits: jax.Array,
    params: SamplingInputs,
    *,
    all_greedy: bool,
    use_top_k_top_p: bool,
    num_logprobs: int,
) -> SampledTokens:
    """Samples one token per row of float32 ``logits`` ``[S, vocab]``."""
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if all_greedy:
        tokens = greedy_tokens
    else:
        is_greedy = params.temperature < GREEDY_EPS
        temperature = jnp.where(is_greedy, 1.0, params.temperature)
        scaled = logits / temperature[:, None]
        if use_top_k_top_p:
            scaled = _mask_top_k_top_p(scaled, params.top_k, params.top_p)

        def draw(seed: jax.Array, index: jax.Array, row: jax.Array) -> jax.Array:
            key = jax.random.fold_in(jax.random.key(seed), index)
            return jax.random.categorical(key, row)

        random_tokens = jax.vmap(draw)(params.seeds, params.draws, scaled).astype(jnp.int32)
        tokens = jnp.where(is_greedy, greedy_tokens, random_tokens)

    if num_logprobs == 0:
        return SampledTokens(tokens, None, None, None, None)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    topk_logprobs, topk_ids = jax.lax.top_k(logprobs, num_logprobs)
    sampled = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    rank = jnp.sum(logprobs >= sampled[:, None], axis=-1).astype(jnp.int32)
    return SampledTokens(tokens, topk_ids.astype(jnp.int32), topk_logprobs, sampled, rank)


def to_host(sampled: SampledTokens, num_reqs: int) -> dict[str, np.ndarray | None]:
    """Copies the real rows back to the host in one transfer."""
    fetched = jax.device_get(sampled)
    return {
        name: (None if value is None else np.asarray(value)[:num_reqs])
        for name, value in fetched._asdict().items()
    }
