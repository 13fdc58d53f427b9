"""Ragged paged attention as a Pallas GPU kernel (Triton lowering).

Same arguments and result as :func:`reference.ragged_paged_attention` (see the package doc for
the layout), plus block-size keywords and ``interpret``.

How it works:

- The packed tokens are cut, per sequence, into blocks of ``block_q`` tokens that never span
  two sequences. A small table computed before the call (plain jnp) lists every (sequence,
  query block) pair; the grid is ``(upper bound on the number of such pairs, num_kv_heads)``,
  and programs past the real pairs return at once. The bound, ``cdiv(num_tokens, block_q) +
  max_num_seqs``, is static, so one compiled kernel serves every batch mix of a shape.
- One program handles the ``block_q`` tokens of its block for one KV head and all the query
  heads that read it (grouped-query attention): the queries are re-laid out before the call as
  ``[kv_heads, tokens x group, head_dim]`` (the group padded to a power of two), so the
  program's rows are one contiguous ``[block_q x group, head_dim]`` tile.
- It loops (``lax.fori_loop``) over KV blocks of ``num_kv_pages_per_block`` pages, visiting
  only the keys its tokens can see (nothing past the last token's position, nothing before the
  first token's sliding window). Each key's cache slot comes from ``page_indices``; K and V for
  the head are gathered with one vector load each, and slots past the sequence's length are
  replaced by zero (they may hold anything, even NaN).
- Scores are scaled, soft-capped and masked (causal, sliding window, padding rows), and folded
  in with an online softmax in fp32. Output rows of other sequences sharing the tile are not
  stored (masked store). Rows of padding tokens are set to zero after the call.

Triton needs power-of-two tile sizes: ``head_dim``, ``page_size``, ``block_q`` and
``num_kv_pages_per_block`` must be powers of two, and a tile must have at least 16 rows and 16
keys for ``tl.dot``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Rows (block_q x padded group) and keys of one tile that the defaults aim for.
DEFAULT_TILE_ROWS = 64
DEFAULT_TILE_KEYS = 64
MIN_DOT_SIZE = 16  # tl.dot needs every dimension >= 16
# Running max before any key is seen: finite, so exp(m_prev - m_new) never sees -inf - -inf.
_M_INIT = -1e30


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _is_power_of_2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def supports(head_dim: int, page_size: int) -> bool:
    """Whether the kernel takes these shapes with its default block sizes (else: reference)."""
    return _is_power_of_2(head_dim) and head_dim >= MIN_DOT_SIZE and _is_power_of_2(page_size)


def default_block_sizes(group: int, page_size: int) -> tuple[int, int]:
    """``(block_q, num_kv_pages_per_block)`` used when the caller gives none."""
    group_pad = _next_power_of_2(group)
    block_q = max(1, DEFAULT_TILE_ROWS // group_pad)
    pages = max(1, DEFAULT_TILE_KEYS // page_size)
    return block_q, pages


def query_blocks(
    kv_lens: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    block_q: int,
    num_programs: int,
) -> jax.Array:
    """The work table: ``[4, num_programs]`` int32 rows (sequence, first token, tokens, first
    position) of every query block; programs past the real blocks have 0 tokens.

    A sequence with ``q`` tokens gets ``cdiv(q, block_q)`` blocks. Padding sequence slots (at
    or past ``num_seqs``) get none, whatever their ``kv_lens`` and ``query_start_loc`` hold.
    """
    max_num_seqs = kv_lens.shape[0]
    real = jnp.arange(max_num_seqs) < jnp.reshape(num_seqs, ())
    starts = query_start_loc[:-1]
    q_lens = jnp.where(real, jnp.maximum(query_start_loc[1:] - starts, 0), 0)
    blocks = -(-q_lens // block_q)
    ends = jnp.cumsum(blocks)  # block j belongs to the s with ends[s - 1] <= j < ends[s]
    j = jnp.arange(num_programs, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, j, side="right"), max_num_seqs - 1).astype(jnp.int32)
    block_in_seq = j - (ends[seq] - blocks[seq])
    first = block_in_seq * block_q
    tokens = jnp.where(j < ends[-1], jnp.clip(q_lens[seq] - first, 0, block_q), 0)
    first_token = starts[seq] + first
    first_position = kv_lens[seq] - q_lens[seq] + first
    return jnp.stack([seq, first_token, tokens, first_position]).astype(jnp.int32)


def _kernel(
    work_ref,  # [4, num_programs] int32: sequence, first token, tokens, first position
    kv_lens_ref,  # [max_num_seqs]
    page_table_ref,  # [max_num_seqs * padded pages_per_seq]
    q_ref,  # [kv_heads, padded tokens x group_pad, head_dim]
    k_ref,  # [num_pages * page_size, kv_heads, head_dim]
    v_ref,
    o_ref,  # like q_ref
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    block_q: int,
    group: int,
    group_pad: int,
    page_size: int,
    pages_per_block: int,
    pages_per_seq: int,
    num_slots: int,
    precision: lax.Precision | None,
):
    j, h = pl.program_id(0), pl.program_id(1)
    tokens = work_ref[2, j]

    @pl.when(tokens > 0)
    def _():
        seq = work_ref[0, j]
        first_token = work_ref[1, j]
        first_position = work_ref[3, j]
        kv_len = kv_lens_ref[seq]
        rows = block_q * group_pad
        block_k = pages_per_block * page_size

        row = jnp.arange(rows, dtype=jnp.int32)
        row_token = row // group_pad
        row_real = (row_token < tokens) & (row % group_pad < group)
        row_position = first_position + row_token
        row_slice = pl.ds(first_token * group_pad, rows)
        q = plgpu.load(q_ref.at[h, row_slice, :], mask=row_real[:, None], other=0)

        # Keys [lo, hi) are visible to some row of the block.
        hi = first_position + tokens
        lo = 0 if sliding_window is None else jnp.maximum(first_position - sliding_window + 1, 0)

        def body(b, carry):
            m, denom, acc = carry
            key = b * block_k + jnp.arange(block_k, dtype=jnp.int32)
            page = page_table_ref[seq * pages_per_seq + key // page_size]
            slot = jnp.clip(page * page_size + key % page_size, 0, num_slots - 1)
            in_seq = (key < kv_len)[:, None]
            # Slots past the sequence may hold anything (NaN): zero them, since 0 x NaN = NaN.
            k = jnp.where(in_seq, k_ref[slot, h, :], 0)
            v = jnp.where(in_seq, v_ref[slot, h, :], 0)
            s = plgpu.dot(q, k, trans_b=True, precision=precision).astype(jnp.float32)
            s = s * jnp.float32(sm_scale)
            if soft_cap is not None:
                s = jnp.float32(soft_cap) * jnp.tanh(s / jnp.float32(soft_cap))
            visible = (key[None, :] <= row_position[:, None]) & row_real[:, None]
            if sliding_window is not None:
                visible &= key[None, :] > row_position[:, None] - sliding_window
            s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[:, None])
            denom = alpha * denom + jnp.sum(p, axis=1)
            pv = plgpu.dot(p.astype(v.dtype), v, precision=precision).astype(jnp.float32)
            return m_new, denom, alpha[:, None] * acc + pv

        head_dim = q.shape[-1]
        init = (
            jnp.full((rows,), _M_INIT, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32),
        )
        _, denom, acc = lax.fori_loop(lo // block_k, pl.cdiv(hi, block_k), body, init)
        safe = jnp.where(denom > 0, denom, 1.0)
        out = jnp.where((denom > 0)[:, None], acc / safe[:, None], 0.0)
        plgpu.store(o_ref.at[h, row_slice, :], out.astype(o_ref.dtype), mask=row_real[:, None])


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "block_q",
        "num_kv_pages_per_block",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
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
    block_q: int | None = None,
    num_kv_pages_per_block: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Ragged paged attention on GPU; arguments and result as ``reference.ragged_paged_attention``.

    - ``block_q``: tokens per query block (a power of two); a tile has ``block_q`` times the
      group (query heads per KV head, rounded up to a power of two) rows. Default: 64 rows.
    - ``num_kv_pages_per_block``: pages per KV step (a power of two). Default: 64 keys.
    - ``num_warps``, ``num_stages``: Triton compiler parameters.
    - ``interpret``: run the kernel in Pallas interpret mode (any backend, CPU included).

    fp32 inputs use full-precision dots (no TF32), so results match the reference to ~1e-6.
    """
    num_tokens, num_q_heads, head_dim = queries.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    max_num_seqs, pages_per_seq = page_indices.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not group over {num_kv_heads} KV heads")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive number of keys, got {sliding_window}")
    group = num_q_heads // num_kv_heads
    group_pad = _next_power_of_2(group)
    default_q, default_pages = default_block_sizes(group, page_size)
    block_q = block_q or default_q
    pages_per_block = num_kv_pages_per_block or default_pages
    for name, value in [
        ("head_dim", head_dim),
        ("page_size", page_size),
        ("block_q", block_q),
        ("num_kv_pages_per_block", pages_per_block),
    ]:
        if not _is_power_of_2(value):
            raise ValueError(f"the GPU kernel needs {name} to be a power of two, got {value}")
    rows, block_k = block_q * group_pad, pages_per_block * page_size
    if min(rows, block_k, head_dim) < MIN_DOT_SIZE:
        raise ValueError(
            f"the GPU kernel needs tiles of at least {MIN_DOT_SIZE}: block_q x group "
            f"({block_q} x {group_pad}), num_kv_pages_per_block x page_size "
            f"({pages_per_block} x {page_size}) and head_dim ({head_dim}); raise the block sizes"
        )

    # Queries as [kv_heads, tokens x group_pad, head_dim]; block_q spare tokens at the end keep
    # every block's rows inside the array (a slice must not run off it, even a masked one).
    padded_tokens = _round_up(num_tokens, block_q) + block_q
    q = queries.reshape(num_tokens, num_kv_heads, group, head_dim)
    q = jnp.pad(q, [(0, padded_tokens - num_tokens), (0, 0), (0, group_pad - group), (0, 0)])
    q = q.transpose(1, 0, 2, 3).reshape(num_kv_heads, padded_tokens * group_pad, head_dim)
    # Whole KV blocks of page-table columns; extra columns are never used as data.
    padded_pages = _round_up(pages_per_seq, pages_per_block)
    page_table = jnp.pad(page_indices, [(0, 0), (0, padded_pages - pages_per_seq)])
    page_table = jnp.clip(page_table, 0, num_pages - 1).reshape(-1)
    k_slots = k_pages.reshape(num_pages * page_size, num_kv_heads, head_dim)
    v_slots = v_pages.reshape(num_pages * page_size, num_kv_heads, head_dim)

    num_programs = pl.cdiv(num_tokens, block_q) + max_num_seqs
    work = query_blocks(
        kv_lens, query_start_loc, num_seqs, block_q=block_q, num_programs=num_programs
    )
    kernel = functools.partial(
        _kernel,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        block_q=block_q,
        group=group,
        group_pad=group_pad,
        page_size=page_size,
        pages_per_block=pages_per_block,
        pages_per_seq=padded_pages,
        num_slots=num_pages * page_size,
        precision=lax.Precision.HIGHEST if queries.dtype == jnp.float32 else None,
    )
    out = pl.pallas_call(
        kernel,
        grid=(num_programs, num_kv_heads),
        out_shape=jax.ShapeDtypeStruct(q.shape, queries.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(work, kv_lens, page_table, q, k_slots, v_slots)

    out = out.reshape(num_kv_heads, padded_tokens, group_pad, head_dim)[:, :num_tokens, :group]
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, num_q_heads, head_dim)
    # Rows of padding tokens belong to no block and were never written.
    is_real = jnp.arange(num_tokens) < query_start_loc[jnp.reshape(num_seqs, ())]
    return jnp.where(is_real[:, None, None], out, jnp.zeros((), out.dtype))
