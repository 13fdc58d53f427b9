"""Ragged paged attention as a Pallas GPU kernel (Triton lowering).

Same arguments and result as :func:`reference.ragged_paged_attention` (see the package doc for
the layout), plus block-size, split-KV and Triton keywords and ``interpret``.

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
- Split-KV ("flash-decoding"): with ``num_kv_splits`` > 1 the grid gets a third axis, and
  program ``s`` of a (query block, KV head) takes the ``s``-th of ``num_kv_splits`` equal,
  contiguous runs of the KV blocks that block sees (computed in the kernel from its visible
  range, so short sequences in a wide page table still split evenly; a run that is empty writes
  the neutral partial: running max ``-1e30``, denominator 0, accumulator 0). Each program writes
  its unnormalised fp32 accumulator, running max and denominator; a jnp step after the call
  merges the splits exactly (rescale each by ``exp(max_s - max)``, sum, divide). Decode batches
  otherwise give only ``num_seqs x num_kv_heads`` programs (512 for 64 sequences and 8 KV
  heads, about 4 per SM of an H100), too few loads in flight to hide memory latency at short
  context. The default (:func:`default_num_kv_splits`) splits only when the static shapes allow
  few query blocks and the page table is long, so prefill-heavy calls keep one split and pay no
  partial-result traffic.
- Work outside the kernel is kept to a few small fused XLA kernels (H100, batch 64 decode at
  2k context: ~13 us against ~198 us for the kernel): the work table (its sequence lookup is a
  ``compare_all`` search; the default binary search became a loop of tiny kernels that cost
  ~60 us a call), the query relayout, and the merge fused with the output relayout. The page
  table is passed as is: the kernel clamps columns and cache slots.

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

from . import tuning
from .validation import check_arguments

# Rows (block_q x padded group) and keys of one tile that the defaults aim for. Decode-shaped
# calls (at most one token per sequence slot) take the smallest tile tl.dot allows: a decode
# block has one real token, and the smaller tile needs fewer registers, so more programs share
# an SM and more loads are in flight (H100, batch 64 at 2k context: 82% of copy bandwidth with
# 16 rows against 74% with 64, both split-KV; benchmarks/RESULTS.md).
DEFAULT_TILE_ROWS = 64
DECODE_TILE_ROWS = 16
DEFAULT_TILE_KEYS = 64
MIN_DOT_SIZE = 16  # tl.dot needs every dimension >= 16
# Running max before any key is seen: finite, so exp(m_prev - m_new) never sees -inf - -inf.
_M_INIT = -1e30
# Split-KV default: aim for about this many programs (query blocks x KV heads x splits), ~31 per
# SM of an H100 (132 SMs), so that enough KV loads are in flight to cover memory latency (batch
# 64 x 8 KV heads: 8 splits; 94% of copy bandwidth at 8k context against 91% with 4) ...
TARGET_PROGRAMS = 4096
# ... while each split keeps at least this many KV blocks (the partials cost extra traffic) ...
MIN_KV_BLOCKS_PER_SPLIT = 4
# ... and at most this many splits.
MAX_KV_SPLITS = 16


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _is_power_of_2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def supports(head_dim: int, page_size: int) -> bool:
    """Whether the kernel takes these shapes with its default block sizes (else: reference)."""
    return _is_power_of_2(head_dim) and head_dim >= MIN_DOT_SIZE and _is_power_of_2(page_size)


def default_block_sizes(group: int, page_size: int, *, decode: bool = False) -> tuple[int, int]:
    """``(block_q, num_kv_pages_per_block)`` used when the caller gives none; ``decode``: the
    call has at most one token per sequence slot (``num_tokens <= max_num_seqs``)."""
    group_pad = _next_power_of_2(group)
    block_q = max(1, (DECODE_TILE_ROWS if decode else DEFAULT_TILE_ROWS) // group_pad)
    pages = max(1, DEFAULT_TILE_KEYS // page_size)
    return block_q, pages


def default_num_kv_splits(
    *,
    num_tokens: int,
    max_num_seqs: int,
    num_kv_heads: int,
    block_q: int,
    kv_blocks_per_seq: int,
    target_programs: int = TARGET_PROGRAMS,
) -> int:
    """Splits of each query block's KV range used when the caller gives none (a power of two).

    From static shapes only: at most ``min(num_tokens, query-block bound)`` query blocks have
    tokens, so a decode-shaped call (few tokens) gets few programs and is split until about
    ``target_programs`` programs exist (the measured table's, else ``TARGET_PROGRAMS``), while
    a prefill-heavy call (many query blocks) keeps one split. Splits never go below
    ``MIN_KV_BLOCKS_PER_SPLIT`` KV blocks of the page table.
    """
    blocks = min(num_tokens, -(-num_tokens // block_q) + max_num_seqs)
    programs = max(1, blocks * num_kv_heads)
    splits = 1
    while (
        splits * 2 <= MAX_KV_SPLITS
        and programs * splits * 2 <= target_programs
        and kv_blocks_per_seq >= splits * 2 * MIN_KV_BLOCKS_PER_SPLIT
    ):
        splits *= 2
    return splits


def measured_tiles(
    head_dim: int, group: int, page_size: int, dtype: jnp.dtype, decode: bool, context: int
) -> tuning.GpuTiles | None:
    """The measured table's tiles for this process's device and the shape (None: defaults;
    the table holds GPUs only, so interpret mode elsewhere runs the defaults)."""
    return tuning.gpu_tiles(
        jax.devices()[0].device_kind,
        head_dim=head_dim,
        group=group,
        page_size=page_size,
        dtype=dtype,
        decode=decode,
        context=context,
    )


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
    # compare_all: one fused comparison; the default binary search is a loop of small kernels.
    seq = jnp.searchsorted(ends, j, side="right", method="compare_all")
    seq = jnp.minimum(seq, max_num_seqs - 1).astype(jnp.int32)
    block_in_seq = j - (ends[seq] - blocks[seq])
    first = block_in_seq * block_q
    tokens = jnp.where(j < ends[-1], jnp.clip(q_lens[seq] - first, 0, block_q), 0)
    first_token = starts[seq] + first
    first_position = kv_lens[seq] - q_lens[seq] + first
    return jnp.stack([seq, first_token, tokens, first_position]).astype(jnp.int32)


def _kernel(
    work_ref,  # [4, num_programs] int32: sequence, first token, tokens, first position
    kv_lens_ref,  # [max_num_seqs]
    page_table_ref,  # [max_num_seqs * pages_per_seq]: page_indices, row-major
    q_ref,  # [kv_heads, padded tokens x group_pad, head_dim]
    k_ref,  # [num_pages * page_size, kv_heads, head_dim]
    v_ref,
    *out_refs,  # one split: o_ref like q_ref; else m, l [splits, kv_heads, rows], acc (+ dim)
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
    num_splits: int,
    precision: lax.Precision | None,
):
    j, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
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
        first_block, end_block = lo // block_k, pl.cdiv(hi, block_k)
        if num_splits > 1:  # this program's share: a contiguous run of the KV blocks
            per_split = pl.cdiv(end_block - first_block, num_splits)
            first_block = jnp.minimum(first_block + split * per_split, end_block)
            end_block = jnp.minimum(first_block + per_split, end_block)

        def body(b, carry):
            m, denom, acc = carry
            key = b * block_k + jnp.arange(block_k, dtype=jnp.int32)
            # Columns past the table (the last block's tail) read its last entry; entries past
            # the sequence may hold anything, and the clip keeps every slot inside the cache.
            column = jnp.minimum(key // page_size, pages_per_seq - 1)
            page = page_table_ref[seq * pages_per_seq + column]
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
        m, denom, acc = lax.fori_loop(first_block, end_block, body, init)
        if num_splits == 1:
            (o_ref,) = out_refs
            safe = jnp.where(denom > 0, denom, 1.0)
            out = jnp.where((denom > 0)[:, None], acc / safe[:, None], 0.0)
            plgpu.store(o_ref.at[h, row_slice, :], out.astype(o_ref.dtype), mask=row_real[:, None])
        else:  # partial result; an empty run stores the init values, which merge as nothing
            m_ref, l_ref, acc_ref = out_refs
            plgpu.store(m_ref.at[split, h, row_slice], m, mask=row_real)
            plgpu.store(l_ref.at[split, h, row_slice], denom, mask=row_real)
            plgpu.store(acc_ref.at[split, h, row_slice, :], acc, mask=row_real[:, None])


def merge_splits(m: jax.Array, denom: jax.Array, acc: jax.Array) -> jax.Array:
    """Exact log-sum-exp merge of split partials over axis 0: running maxima ``m`` and
    denominators ``denom`` ``[splits, ...]``, unnormalised accumulators ``acc`` ``[splits, ...,
    head_dim]``; fp32 result, zero where no split saw a key."""
    # Unrolled over the (few) splits: elementwise ops only, so XLA fuses the whole merge, and
    # the output relayout after it, into one kernel (reductions over axis 0 took three).
    num_splits = m.shape[0]
    m_all = m[0]
    for s in range(1, num_splits):
        m_all = jnp.maximum(m_all, m[s])
    total, out = 0.0, 0.0
    for s in range(num_splits):
        weight = jnp.exp(m[s] - m_all)  # an empty split has m = -1e30: weight 0 (1 if all are)
        total = total + weight * denom[s]
        out = out + weight[..., None] * acc[s]
    safe = jnp.where(total > 0, total, 1.0)
    return jnp.where((total > 0)[..., None], out / safe[..., None], 0.0)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "causal",
        "block_q",
        "num_kv_pages_per_block",
        "num_kv_splits",
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
    causal: bool = True,
    block_q: int | None = None,
    num_kv_pages_per_block: int | None = None,
    num_kv_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Ragged paged attention on GPU; arguments and result as ``reference.ragged_paged_attention``.

    - ``block_q``: tokens per query block (a power of two); a tile has ``block_q`` times the
      group (query heads per KV head, rounded up to a power of two) rows. Default: 64 rows.
    - ``num_kv_pages_per_block``: pages per KV step (a power of two). Default: 64 keys.
    - ``num_kv_splits``: programs sharing each query block's KV range (split-KV), merged after
      the call; 1 is the plain kernel. Default: :func:`default_num_kv_splits`.
    - ``num_warps``, ``num_stages``: Triton compiler parameters (default 4 and 2).

    What the caller leaves as None comes from the measured table of this GPU and shape
    (:func:`tuning.gpu_tiles`, ``gpu_tuning_table.py``: the entry nearest the page table's
    length), and from the defaults above where the table has no entry.
    - ``interpret``: run the kernel in Pallas interpret mode (any backend, CPU included).

    fp32 inputs use full-precision dots (no TF32), so results match the reference to ~1e-6.
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
        implementation="the GPU kernel",
    )
    num_tokens, num_q_heads, head_dim = queries.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    max_num_seqs, pages_per_seq = page_indices.shape
    group_pad = _next_power_of_2(group)
    decode = num_tokens <= max_num_seqs
    default_q, default_pages = default_block_sizes(group, page_size, decode=decode)
    context = pages_per_seq * page_size
    tiles = measured_tiles(head_dim, group, page_size, queries.dtype, decode, context)
    if tiles is not None:
        default_q = max(1, tiles.tile_rows // group_pad)
        default_pages = tiles.kv_pages_per_block
        num_warps = num_warps or tiles.num_warps
        num_stages = num_stages or tiles.num_stages
    num_warps, num_stages = num_warps or 4, num_stages or 2
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
    kv_blocks_per_seq = pl.cdiv(pages_per_seq, pages_per_block)
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(
            num_tokens=num_tokens,
            max_num_seqs=max_num_seqs,
            num_kv_heads=num_kv_heads,
            block_q=block_q,
            kv_blocks_per_seq=kv_blocks_per_seq,
            target_programs=tiles.target_programs if tiles is not None else TARGET_PROGRAMS,
        )
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be at least 1, got {num_kv_splits}")

    # Queries as [kv_heads, tokens x group_pad, head_dim]; block_q spare tokens at the end keep
    # every block's rows inside the array (a slice must not run off it, even a masked one).
    padded_tokens = _round_up(num_tokens, block_q) + block_q
    q = queries.reshape(num_tokens, num_kv_heads, group, head_dim)
    q = jnp.pad(q, [(0, padded_tokens - num_tokens), (0, 0), (0, group_pad - group), (0, 0)])
    q = q.transpose(1, 0, 2, 3).reshape(num_kv_heads, padded_tokens * group_pad, head_dim)
    # Used as is (a free reshape): the kernel clamps columns and slots itself.
    page_table = page_indices.astype(jnp.int32).reshape(-1)
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
        pages_per_seq=pages_per_seq,
        num_slots=num_pages * page_size,
        num_splits=num_kv_splits,
        precision=lax.Precision.HIGHEST if queries.dtype == jnp.float32 else None,
    )
    if num_kv_splits == 1:
        out_shape = jax.ShapeDtypeStruct(q.shape, queries.dtype)
    else:
        stats = jax.ShapeDtypeStruct((num_kv_splits,) + q.shape[:2], jnp.float32)
        out_shape = (stats, stats, jax.ShapeDtypeStruct((num_kv_splits,) + q.shape, jnp.float32))
    out = pl.pallas_call(
        kernel,
        grid=(num_programs, num_kv_heads, num_kv_splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(work, kv_lens, page_table, q, k_slots, v_slots)
    if num_kv_splits > 1:
        out = merge_splits(*out)

    out = out.reshape(num_kv_heads, padded_tokens, group_pad, head_dim)[:, :num_tokens, :group]
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, num_q_heads, head_dim)
    # Rows of padding tokens belong to no block and were never written.
    is_real = jnp.arange(num_tokens) < query_start_loc[jnp.reshape(num_seqs, ())]
    return jnp.where(is_real[:, None, None], out, jnp.zeros((), queries.dtype)).astype(
        queries.dtype
    )
