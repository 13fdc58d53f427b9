"""Per-request logits processing inside the jitted sampler, batched over rows.

Every request's own list (allowed ids, logit-bias ids, stop ids, bad words, past tokens) arrives
as a padded ``[S, width]`` array whose padding id is the vocabulary size: scatters use
``mode="drop"``, so padding touches nothing and rows without the feature are no-ops. That keeps
one compiled program for a batch mixing requests with and without a parameter; the program
changes only when a feature appears in the batch at all (the field is then not ``None``) or a
width bucket grows.

Semantics are vLLM's v1 sampler (``vllm/v1/sample``): the grammar bitmask and allowed ids mask
to -inf, bad words ban a word's last token when the request's output ends with the word's
prefix, min-tokens masks stop tokens until enough tokens were generated, logit bias adds,
repetition penalty divides positive and multiplies negative logits of tokens seen in prompt or
output, frequency and presence penalties subtract per output occurrence / once per output token,
min-p drops tokens below ``min_p`` times the most likely token's probability.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def _rows(ids: jax.Array) -> jax.Array:
    """Row indices broadcast to ``ids``' shape, for ``.at[rows, ids]`` scatters."""
    return jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)


def apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """Masks tokens whose bit is 0 in the packed int32 ``bitmask`` ``[S, ceil(V/32)]``.

    The layout is xgrammar's (bit ``j % 32`` of word ``j // 32`` allows token ``j``); rows
    without a grammar are all ones (-1). Tokens past the mask's width stay allowed, as in
    xgrammar's own kernels (the model's vocabulary can be padded beyond the tokenizer's).
    """
    vocab = logits.shape[-1]
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :vocab] != 0
    if allowed.shape[1] < vocab:
        allowed = jnp.pad(allowed, ((0, 0), (0, vocab - allowed.shape[1])), constant_values=True)
    return jnp.where(allowed, logits, NEG_INF)


def apply_allowed_ids(logits: jax.Array, allowed_ids: jax.Array) -> jax.Array:
    """Keeps only each row's ``allowed_ids`` (padding = vocab); rows with none keep all."""
    vocab = logits.shape[-1]
    allowed = (
        jnp.zeros(logits.shape, bool).at[_rows(allowed_ids), allowed_ids].set(True, mode="drop")
    )
    has_list = jnp.any(allowed_ids < vocab, axis=-1, keepdims=True)
    return jnp.where(allowed | ~has_list, logits, NEG_INF)


def apply_bad_words(logits: jax.Array, words: jax.Array, history: jax.Array) -> jax.Array:
    """Bans the last token of every bad word whose prefix ends the request's output.

    ``words`` ``[S, W, L]`` holds each word right-aligned: -1 before its first token (matches
    anything), its last token in column ``L - 1`` (-1 for padding words). ``history``
    ``[S, L - 1]`` is the output's last ``L - 1`` tokens, -2 where the output is shorter (so a
    word longer than the output plus one never matches, as in vLLM).
    """
    prefix, last = words[:, :, :-1], words[:, :, -1]
    matches = jnp.all((prefix == -1) | (prefix == history[:, None, :]), axis=-1)
    banned = jnp.where(matches & (last >= 0), last, logits.shape[-1])
    return logits.at[_rows(banned), banned].set(NEG_INF, mode="drop")


def apply_min_tokens(
    logits: jax.Array, stop_ids: jax.Array, restore_if_empty: jax.Array
) -> jax.Array:
    """Masks ``stop_ids`` (padding = vocab; all padding once ``min_tokens`` is reached).

    For structured-output rows (``restore_if_empty``), vLLM puts the stop tokens back when the
    grammar left nothing else: a grammar that must end now is obeyed over ``min_tokens``.
    """
    rows = _rows(stop_ids)
    masked = logits.at[rows, stop_ids].set(NEG_INF, mode="drop")
    empty = jnp.all(masked == NEG_INF, axis=-1) & restore_if_empty
    stop_logits = logits.at[rows, stop_ids].get(mode="fill", fill_value=NEG_INF)
    restore = jnp.where(empty[:, None], stop_ids, logits.shape[-1])
    return masked.at[rows, restore].set(stop_logits, mode="drop")


def apply_logit_bias(logits: jax.Array, bias_ids: jax.Array, bias: jax.Array) -> jax.Array:
    return logits.at[_rows(bias_ids), bias_ids].add(bias, mode="drop")


def apply_penalties(
    logits: jax.Array,
    tokens: jax.Array,
    num_prompt: jax.Array,
    num_tokens: jax.Array,
    presence: jax.Array,
    frequency: jax.Array,
    repetition: jax.Array,
) -> jax.Array:
    """vLLM's penalties from each row's token ids ``[S, L]`` (prompt then output, padded).

    Repetition counts prompt and output tokens; frequency and presence count output tokens only
    (OpenAI's definition). Counting happens here, from the persistent batch's token ids, so no
    per-request count state has to follow preemption, resumption or slot reuse.
    """
    vocab = logits.shape[-1]
    position = jnp.arange(tokens.shape[1])[None, :]
    is_prompt = position < num_prompt[:, None]
    is_output = ~is_prompt & (position < num_tokens[:, None])
    rows = _rows(tokens)
    counts = (
        jnp.zeros(logits.shape, jnp.float32)
        .at[rows, jnp.where(is_output, tokens, vocab)]
        .add(1.0, mode="drop")
    )
    in_prompt = (
        jnp.zeros(logits.shape, bool)
        .at[rows, jnp.where(is_prompt, tokens, vocab)]
        .set(True, mode="drop")
    )
    in_output = counts > 0
    rep = jnp.where(in_prompt | in_output, repetition[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = logits - frequency[:, None] * counts
    return logits - presence[:, None] * in_output.astype(logits.dtype)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drops tokens whose probability is below ``min_p`` x the top token's (0 = off)."""
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = jnp.max(probs, axis=-1, keepdims=True) * min_p[:, None]
    return jnp.where(probs < threshold, NEG_INF, logits)


def mask_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
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


def gather_logprobs(
    scores: jax.Array, token_ids: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """vLLM's layout: ``[token, top-k...]`` ids and scores, and the token's rank (ties count)."""
    top_scores, top_ids = jax.lax.top_k(scores, k)
    chosen = jnp.take_along_axis(scores, token_ids[:, None], axis=-1)
    rank = jnp.sum(scores >= chosen, axis=-1).astype(jnp.int32)
    ids = jnp.concatenate([token_ids[:, None], top_ids.astype(jnp.int32)], axis=1)
    return ids, jnp.concatenate([chosen, top_scores], axis=1), rank


def chosen_logprobs(
    scores: jax.Array, chosen: jax.Array, top_ids: jax.Array, top_scores: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Rows that asked for ``logprob_token_ids`` get those ids' scores instead of the top-k.

    ``chosen`` ``[S, T]`` is padded with -1 (score -inf, id 0; vLLM's output keeps only as many
    columns as the request asked for); both results are ``max(K, T)`` wide.
    """
    width = max(top_ids.shape[1], chosen.shape[1])

    def widen(x: jax.Array, fill: float | int) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=fill)

    valid = chosen >= 0
    ids = jnp.where(valid, chosen, 0)
    values = jnp.where(valid, jnp.take_along_axis(scores, ids, axis=-1), NEG_INF)
    has = jnp.any(valid, axis=-1, keepdims=True)
    return (
        jnp.where(has, widen(ids, 0), widen(top_ids, 0)),
        jnp.where(has, widen(values, NEG_INF), widen(top_scores, NEG_INF)),
    )
