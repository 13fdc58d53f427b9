"""The specification of ragged paged attention, in plain ``jax.numpy``.

Every other implementation is tested against this one, and the CPU backend runs it. It is
written for clarity first, then for bounded memory: tokens are processed in fixed blocks, and
each token gathers only its own sequence's pages, so the work is ``num_tokens x kv_width`` and
the peak memory ``block x kv_width x heads x head_dim`` whatever the batch mix.

Writing the step's new keys/values into the pages is a separate scatter
(:func:`write_kv_pages`), run before attention, so attention sees the current tokens too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .validation import check_arguments

DEFAULT_TOKEN_BLOCK = 16


def write_kv_pages(
    k_pages: jax.Array,
    v_pages: jax.Array,
    new_k: jax.Array,
    new_v: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatters ``new_k``/``new_v`` (``[num_tokens, kv_heads, head_dim]``) into the pages.

    ``slot_mapping[t]`` is ``page * page_size + offset`` for token ``t``; padding tokens carry a
    slot past the end of the cache (``num_pages * page_size`` or more) or a negative slot (vLLM's
    ``PAD_SLOT_ID`` is -1) and are dropped, so they can never overwrite a real entry.
    """
    num_pages, page_size = k_pages.shape[:2]
    # A negative slot would wrap around to the cache's last page: send it past the end instead.
    slot_mapping = jnp.where(slot_mapping < 0, num_pages * page_size, slot_mapping)
    # Index the 4-D pages directly: a scatter into a reshaped (flattened) view is lowered by
    # XLA CPU to a full-array loop plus copies (measured 130 ms a step for a 64 MB cache);
    # this form stays an in-place update. Padding slots give a page index past the end.
    page, offset = slot_mapping // page_size, slot_mapping % page_size
    k_pages = k_pages.at[page, offset].set(new_k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[page, offset].set(new_v.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages


def token_layout(
    kv_lens: jax.Array, query_start_loc: jax.Array, num_seqs: jax.Array, num_tokens: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For each packed token: its sequence, its absolute position, and whether it is real.

    Shared by every implementation that needs per-token metadata (reference, tests).
    """
    max_num_seqs = kv_lens.shape[0]
    token_index = jnp.arange(num_tokens, dtype=jnp.int32)
    real_seqs = jnp.reshape(num_seqs, ())
    # The sequence of token t is the s with query_start_loc[s] <= t < query_start_loc[s + 1].
    # Rows past num_seqs may hold anything: mask them so the search runs on a sorted array.
    real_ends = jnp.where(
        jnp.arange(max_num_seqs) < real_seqs, query_start_loc[1:], jnp.iinfo(jnp.int32).max
    )
    seq_of_token = jnp.searchsorted(real_ends, token_index, side="right").astype(jnp.int32)
    seq_of_token = jnp.minimum(seq_of_token, max_num_seqs - 1)
    is_real = token_index < query_start_loc[real_seqs]
    query_len = query_start_loc[seq_of_token + 1] - query_start_loc[seq_of_token]
    position = kv_lens[seq_of_token] - query_len + (token_index - query_start_loc[seq_of_token])
    return seq_of_token, position, is_real


def in_blocks(x: jax.Array, block: int, fill: int | bool = 0) -> jax.Array:
    """``x`` (``[tokens, ...]``) padded with ``fill`` to whole blocks: ``[blocks, block, ...]``.

    Shared by every jnp implementation that walks the packed tokens block by block.
    """
    pad = -x.shape[0] % block
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(-1, block, *x.shape[1:])


def ragged_paged_attention(
    queries: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    causal: bool = True,
    token_block: int = DEFAULT_TOKEN_BLOCK,
) -> jax.Array:
    """Attention of every packed token against its own sequence's paged KV (see package doc).

    ``causal=False`` is bidirectional attention (encoders such as BERT): every token of a
    sequence sees all ``kv_lens`` keys of it, later ones included.

    Returns ``[num_tokens, num_q_heads, head_dim]`` in the queries' dtype; rows of padding
    tokens are zero.
    """
    group = check_arguments(
        queries,
        k_pages,
        v_pages,
        kv_lens,
        page_indices,
        query_start_loc,
        sliding_window=sliding_window,
        causal=causal,
    )
    num_tokens, num_q_heads, head_dim = queries.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    kv_width = page_indices.shape[1] * page_size

    seq_of_token, position, is_real = token_layout(kv_lens, query_start_loc, num_seqs, num_tokens)

    block = min(token_block, num_tokens)
    padded_tokens = -(-num_tokens // block) * block
    blocked = (
        in_blocks(queries.reshape(num_tokens, num_kv_heads, group, head_dim), block),
        in_blocks(seq_of_token, block),
        in_blocks(position, block),
        in_blocks(is_real, block, False),
    )
    key_position = jnp.arange(kv_width, dtype=jnp.int32)

    def attend_block(args: tuple[jax.Array, ...]) -> jax.Array:
        q, seq, pos, real = args
        pages = page_indices[seq]  # [block, pages_per_seq]
        page_of_key = pages[:, key_position // page_size]  # [block, kv_width]
        offset_of_key = key_position % page_size
        k = k_pages[page_of_key, offset_of_key[None, :]]  # [block, kv_width, kv_heads, dim]
        v = v_pages[page_of_key, offset_of_key[None, :]]
        scores = jnp.einsum(
            "bhgd,bkhd->bhgk", q.astype(jnp.float32), k.astype(jnp.float32)
        ) * jnp.float32(sm_scale)
        if soft_cap is not None:
            scores = jnp.float32(soft_cap) * jnp.tanh(scores / jnp.float32(soft_cap))
        if causal:
            visible = key_position[None, :] <= pos[:, None]
        else:  # the whole sequence, this step's later tokens included
            visible = key_position[None, :] < kv_lens[seq][:, None]
        if sliding_window is not None:
            visible &= key_position[None, :] > pos[:, None] - sliding_window
        visible &= real[:, None]
        scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
        # Slots no query can see (past a sequence, other sequences' pages) may hold anything,
        # even NaN: zero them, since a zero weight times NaN is still NaN.
        v = jnp.where(visible[:, :, None, None], v, jnp.zeros((), v.dtype))
        # Padding tokens see no key at all; keep their softmax finite, then zero them.
        row_max = jnp.max(scores, axis=-1, keepdims=True)
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        weights = jnp.exp(scores - row_max)
        denom = jnp.sum(weights, axis=-1, keepdims=True)
        out = jnp.einsum("bhgk,bkhd->bhgd", weights, v.astype(jnp.float32))
        out = jnp.where(denom > 0, out / jnp.where(denom > 0, denom, 1.0), 0.0)
        return out.reshape(block, num_q_heads, head_dim)

    out = jax.lax.map(attend_block, blocked)
    return out.reshape(padded_tokens, num_q_heads, head_dim)[:num_tokens].astype(queries.dtype)
