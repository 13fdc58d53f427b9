"""Ragged paged attention for XLA backends without a Pallas kernel (the CPU), in plain jnp.

The reference attends every token to the page table's whole width, so its cost is
``num_tokens x width`` and the runner must bucket the width to keep short contexts cheap;
every width is then one more compiled program per token bucket (5 times as many programs for
a 2048-token model, benchmarks/NOTES_startup.md). This implementation walks each block of
tokens over its keys in chunks, with an online softmax, in a ``while_loop`` whose trip count
is the block's own longest visible prefix: the work follows the real KV lengths, and the page
table can always be the model's full width at no cost (one program per token bucket).

Two more things the reference does not do, both for CPU speed:
- a block whose real tokens all belong to one sequence (a prefill chunk) gathers each key
  chunk once for all of its tokens, instead of once per token;
- a sliding window starts the walk at the block's first visible chunk.

Numbers are the reference's up to float rounding (tests/kernels/test_xla_attention.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .reference import in_blocks, token_layout
from .validation import check_arguments

DEFAULT_TOKEN_BLOCK = 16
DEFAULT_KV_CHUNK = 128  # keys per loop iteration: 8 pages of 16


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
    token_block: int = DEFAULT_TOKEN_BLOCK,
    kv_chunk: int = DEFAULT_KV_CHUNK,
) -> jax.Array:
    """Same arguments and result as ``reference.ragged_paged_attention`` (see package doc)."""
    group = check_arguments(
        queries,
        k_pages,
        v_pages,
        kv_lens,
        page_indices,
        query_start_loc,
        sliding_window=sliding_window,
    )
    num_tokens, num_q_heads, head_dim = queries.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    pages_per_seq = page_indices.shape[1]
    # A whole number of pages per chunk, and no wider than the page table.
    chunk = min(max(1, kv_chunk // page_size), pages_per_seq) * page_size

    seq_of_token, position, is_real = token_layout(kv_lens, query_start_loc, num_seqs, num_tokens)
    # Blocks of one sequence (prefill chunks) gather each key chunk once for all their tokens.
    # A bucket with no more tokens than sequences holds decodes and short chunks: one block
    # of all its tokens, walked to the longest sequence's length (as the reference's bucketed
    # width would), the per-token gather alone, and a third of the program to compile.
    shared_branch = num_tokens > page_indices.shape[0]
    block = min(token_block, num_tokens) if shared_branch else num_tokens
    padded_tokens = -(-num_tokens // block) * block

    # Everything below that depends on the metadata only is the same in every layer, and
    # XLA merges it across layers (CSE): only the loop itself is compiled once per layer,
    # which keeps a 30-layer step program cheap to compile.
    seq = in_blocks(seq_of_token, block)
    pos = in_blocks(position, block)
    real = in_blocks(is_real, block, False)
    last = jnp.max(jnp.where(real, pos, -1), axis=1)
    end_chunk = (last + chunk) // chunk  # chunks covering keys 0..last; 0 if no real token
    start_chunk = jnp.zeros_like(end_chunk)
    if sliding_window is not None:
        first = jnp.min(jnp.where(real, pos, jnp.iinfo(jnp.int32).max), axis=1)
        start_chunk = jnp.clip(first - sliding_window + 1, 0, None) // chunk
    one_sequence = jnp.all(jnp.where(real, seq == seq[:, :1], True), axis=1)
    blocked = (
        in_blocks(queries.reshape(num_tokens, num_kv_heads, group, head_dim), block),
        seq,
        pos,
        real,
        start_chunk,
        end_chunk,
        one_sequence,
    )
    chunk_offsets = jnp.arange(chunk, dtype=jnp.int32)
    scale = jnp.float32(sm_scale)

    def attend_block(args: tuple[jax.Array, ...]) -> jax.Array:
        q, seq, pos, real, start, end, one_sequence = args
        q = q.astype(jnp.float32)

        def step(carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            c, row_max, denom, acc = carry
            key_pos = c * chunk + chunk_offsets  # [chunk]
            page_col = jnp.minimum(key_pos // page_size, pages_per_seq - 1)
            offset = key_pos % page_size
            visible = key_pos[None, :] <= pos[:, None]
            if sliding_window is not None:
                visible &= key_pos[None, :] > pos[:, None] - sliding_window
            visible &= real[:, None]  # [block, chunk]

            def update(k: jax.Array, v: jax.Array, shared: bool) -> tuple[jax.Array, ...]:
                """One chunk of online softmax; ``shared``: k/v are [chunk, ...] for all."""
                tokens = "" if shared else "b"
                s = jnp.einsum(f"bhgd,{tokens}khd->bhgk", q, k.astype(jnp.float32)) * scale
                if soft_cap is not None:
                    s = jnp.float32(soft_cap) * jnp.tanh(s / jnp.float32(soft_cap))
                s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
                new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
                safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
                weights = jnp.exp(s - safe_max[..., None])
                rescale = jnp.exp(row_max - safe_max)
                pv = jnp.einsum(f"bhgk,{tokens}khd->bhgd", weights, v.astype(jnp.float32))
                out = acc * rescale[..., None] + pv
                return new_max, denom * rescale + jnp.sum(weights, axis=-1), out

            def per_token() -> tuple[jax.Array, ...]:
                page = page_indices[seq[:, None], page_col[None, :]]  # [block, chunk]
                k, v = k_pages[page, offset[None, :]], v_pages[page, offset[None, :]]
                # Slots a token may not see can hold anything, even NaN (0 x NaN is NaN).
                v = jnp.where(visible[:, :, None, None], v, jnp.zeros((), v.dtype))
                return update(k, v, False)

            def shared() -> tuple[jax.Array, ...]:
                page = page_indices[seq[0], page_col]  # [chunk]
                k, v = k_pages[page, offset], v_pages[page, offset]
                seen = jnp.any(visible, axis=0)[:, None, None]
                return update(k, jnp.where(seen, v, jnp.zeros((), v.dtype)), True)

            if shared_branch:
                row_max, denom, acc = jax.lax.cond(one_sequence, shared, per_token)
            else:
                row_max, denom, acc = per_token()
            return c + 1, row_max, denom, acc

        stats_shape = (block, num_kv_heads, group)
        init = (
            start,
            jnp.full(stats_shape, -jnp.inf, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32),
        )
        _, _, denom, acc = jax.lax.while_loop(lambda carry: carry[0] < end, step, init)
        out = jnp.where(denom[..., None] > 0, acc / jnp.where(denom > 0, denom, 1.0)[..., None], 0)
        return out.reshape(block, num_q_heads, head_dim)

    if padded_tokens == block:
        out = attend_block(tuple(x[0] for x in blocked))
    else:
        out = jax.lax.map(attend_block, blocked)
    return out.reshape(padded_tokens, num_q_heads, head_dim)[:num_tokens].astype(queries.dtype)
