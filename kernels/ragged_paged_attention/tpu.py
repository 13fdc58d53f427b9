"""Ragged paged attention as one Mosaic TPU Pallas kernel (same numbers as ``reference.py``).

One ``pallas_call`` serves the whole packed batch, any mix of prefill chunks and decodes:

- The grid walks the packed tokens in blocks of ``num_queries_per_block`` (``bq``) rows; the query
  and output blocks are ordinary VMEM ``BlockSpec`` blocks. A block may hold the tail of one
  sequence, several whole decodes and the head of a prefill chunk: the step loops over exactly
  the sequences whose tokens it holds (their range is computed before the call and scalar-
  prefetched with ``kv_lens``, the flattened ``page_indices``, ``query_start_loc`` and
  ``num_seqs``).
- For each such sequence it walks the KV blocks the block's tokens can see (``bkv`` =
  ``num_kv_pages_per_block x page_size`` keys; blocks after the last token's position and, with a
  sliding window, before the first token's window are skipped, never fetched). Pages stay in HBM
  (``memory_space=pl.ANY``) and are copied page by page into a two-slot VMEM buffer with
  ``pltpu.make_async_copy``: while one slot is computed on, the next (sequence, KV block) is
  already in flight into the other slot. By default the chain continues across grid steps (a
  step's last KV block prefetches the next step's first), which needs an in-order
  ("arbitrary") grid; on megacore chips (v4, v5p) the grid is "parallel" instead, so both
  TensorCores share it, and each step starts its own first copy. Only pages that hold visible
  keys are copied; page-table entries past a sequence's length and padding rows are never read.
- Per KV head, the group's query heads are stacked into one ``[group * rows, head_dim]`` tile (so
  GQA fills MXU rows), scores go through the soft cap and the causal / window mask, and an online
  softmax (running max, running sum, f32 accumulator in VMEM scratch) folds the KV blocks in.
- Each sequence is computed on the smallest aligned row tile that holds its tokens in the block
  (one native tile of 8/16 rows for a decode, a quarter block for a short chunk, else the whole
  block), so decode-heavy batches do not pay for the block's other rows.
- Rows of padding tokens are written as zeros; rows of real tokens are written only by their own
  sequence, so a row the kernel forgot would stay uninitialised (NaN in interpret mode).

Writing the step's new keys and values into the pages is **not** done here: it stays the separate
scatter ``reference.write_kv_pages`` (an XLA scatter run before attention), so this kernel only
reads the cache.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import tuning
from .validation import check_arguments

# Masked scores: finite so that a row with no visible key in a block keeps a finite softmax; a
# real score later rescales its contribution by exp(MASK - real) == 0 exactly.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _kernel(
    # Scalar prefetch (SMEM).
    kv_lens_ref,
    page_table_ref,  # [max_num_seqs * pages_per_seq], row-major page_indices
    query_start_ref,
    num_seqs_ref,
    block_first_seq_ref,  # [num_blocks]: first sequence with a token in the block
    block_end_seq_ref,  # [num_blocks]: one past the last such sequence
    # Inputs.
    q_ref,  # VMEM [bq, num_q_heads * head_dim]
    k_hbm_ref,  # HBM [num_pages, page_size, num_kv_heads, head_dim] ([.., head_dim]: 1 head)
    v_hbm_ref,
    # Output.
    o_ref,  # VMEM [bq, num_q_heads * head_dim]
    # Scratch.
    k_buf,  # VMEM [2, bkv, num_kv_heads, head_dim] ([2, bkv, head_dim]: 1 head)
    v_buf,
    sems,  # DMA [2 (slot), 2 (k, v)]
    m_ref,  # VMEM f32 [num_kv_heads, group * bq, 128]: running max (lane-replicated)
    l_ref,  # VMEM f32 [num_kv_heads, group * bq, 128]: running sum
    acc_ref,  # VMEM f32 [num_kv_heads, group * bq, head_dim]
    next_slot_ref,  # SMEM [1]: the slot the previous grid step prefetched into
    *,
    bq: int,
    tiles: tuple[int, ...],
    cross_step: bool,
    pages_per_block: int,
    page_size: int,
    pages_per_seq: int,
    max_num_seqs: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    bkv = pages_per_block * page_size
    block = pl.program_id(0)
    num_blocks = pl.num_programs(0)
    block_start = block * bq
    first_seq = block_first_seq_ref[block]
    end_seq = block_end_seq_ref[block]

    def clamp_seq(s, end):
        """A sequence index safe to read (its values are only used while s < end)."""
        return jnp.maximum(jnp.minimum(s, end - 1), 0)

    def seq_meta(s, blk):
        """Scalars of sequence ``s`` as seen from block ``blk`` of tokens."""
        q_start = query_start_ref[s]
        q_end = query_start_ref[s + 1]
        kv_len = kv_lens_ref[s]
        row_lo = jnp.maximum(q_start, blk * bq)  # absolute token index
        row_hi = jnp.minimum(q_end, blk * bq + bq)
        first_pos = kv_len - (q_end - q_start) + (row_lo - q_start)
        kv_hi = first_pos + (row_hi - row_lo)  # one past the last visible key
        kv_lo = jnp.int32(0)
        if sliding_window is not None:
            kv_lo = jnp.maximum(first_pos - (sliding_window - 1), 0)
        nonempty = row_hi > row_lo
        kv_block_lo = kv_lo // bkv
        kv_block_hi = jnp.where(nonempty, (kv_hi + bkv - 1) // bkv, kv_block_lo)
        return dict(
            q_start=q_start,
            q_end=q_end,
            kv_len=kv_len,
            row_lo=row_lo,
            row_hi=row_hi,
            kv_lo=kv_lo,
            kv_hi=kv_hi,
            page_lo=kv_lo // page_size,
            page_hi=(kv_hi + page_size - 1) // page_size,
            kv_block_lo=kv_block_lo,
            kv_block_hi=kv_block_hi,
        )

    def copy_page(s, n, page, slot, action):
        """Starts or waits the copies of page ``page`` of sequence ``s`` into buffer page ``n``."""
        physical_page = page_table_ref[s * pages_per_seq + jnp.minimum(page, pages_per_seq - 1)]
        rows = pl.ds(n * page_size, page_size)
        for i, (src, dst) in enumerate(((k_hbm_ref, k_buf), (v_hbm_ref, v_buf))):
            copy = pltpu.make_async_copy(
                src.at[physical_page], dst.at[slot, rows], sems.at[slot, i]
            )
            if action == "start":
                copy.start()
            else:
                copy.wait()

    def kv_copies(s, kv_block, slot, meta, action):
        """Starts or waits the page copies of one KV block (only pages with visible keys)."""
        for n in range(pages_per_block):
            page = kv_block * pages_per_block + n
            visible = (page >= meta["page_lo"]) & (page < meta["page_hi"])
            pl.when(visible)(functools.partial(copy_page, s, n, page, slot, action))

    def next_nonempty_seq(s, end):
        """The first sequence >= s with tokens (``end`` if none); sequences in a block's range
        have tokens in it unless they have none at all."""

        def empty(s):
            safe = jnp.minimum(s, max_num_seqs - 1)  # both sides of & are evaluated
            return (s < end) & (query_start_ref[safe + 1] <= query_start_ref[safe])

        return lax.while_loop(empty, lambda s: s + 1, s)

    def attend(tile: int, row0, s, kv_block, slot, meta):
        """Folds one KV block into the running softmax of rows [row0, row0 + tile) of the block."""
        rows = group * tile
        token = block_start + row0 + lax.broadcasted_iota(jnp.int32, (tile, 1), 0)
        in_seq = (token >= meta["row_lo"]) & (token < meta["row_hi"])
        position = meta["kv_len"] - meta["q_end"] + token
        # Query heads of one KV head are stacked group-major: row g * tile + t.
        position = jnp.concatenate([position] * group, axis=0)
        in_seq = jnp.concatenate([in_seq] * group, axis=0)
        key = kv_block * bkv + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
        visible = in_seq & (key <= position)
        if sliding_window is not None:
            visible &= key > position - sliding_window
        # Values no row of the block can see (stale VMEM of pages not copied, cache slots past the
        # sequence) are zeroed, so that 0 * NaN never reaches the accumulator.
        key_col = kv_block * bkv + lax.broadcasted_iota(jnp.int32, (bkv, 1), 0)
        copied = (key_col >= meta["kv_lo"]) & (key_col < meta["kv_hi"])

        @pl.when(kv_block == meta["kv_block_lo"])
        def _init():
            m_ref[:, :rows] = jnp.full((num_kv_heads, rows, 128), -jnp.inf, jnp.float32)
            l_ref[:, :rows] = jnp.zeros((num_kv_heads, rows, 128), jnp.float32)
            acc_ref[:, :rows] = jnp.zeros((num_kv_heads, rows, head_dim), jnp.float32)

        q_tile = q_ref[pl.ds(row0, tile), :]
        precision = lax.Precision.HIGHEST if q_tile.dtype == jnp.float32 else None
        for h in range(num_kv_heads):
            k = k_buf[slot, :, h, :] if len(k_buf.shape) == 4 else k_buf[slot]
            v = v_buf[slot, :, h, :] if len(v_buf.shape) == 4 else v_buf[slot]
            v = jnp.where(copied, v, jnp.zeros((), v_buf.dtype))
            heads = [(h * group + g) * head_dim for g in range(group)]
            q = jnp.concatenate([q_tile[:, c : c + head_dim] for c in heads], axis=0)
            scores = lax.dot_general(
                q,
                k,
                (((1,), (1,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            ) * jnp.float32(sm_scale)
            if soft_cap is not None:
                scores = jnp.float32(soft_cap) * jnp.tanh(scores / jnp.float32(soft_cap))
            scores = jnp.where(visible, scores, MASK_VALUE)
            m_prev = m_ref[h, :rows]
            m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.exp(scores - m_next[:, :1])
            l_ref[h, :rows] = alpha * l_ref[h, :rows] + jnp.sum(p, axis=1, keepdims=True)
            m_ref[h, :rows] = m_next
            pv = lax.dot_general(
                p.astype(v.dtype),
                v,
                (((1,), (0,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            acc_ref[h, :rows] = acc_ref[h, :rows] * alpha[:, :1] + pv

        @pl.when(kv_block == meta["kv_block_hi"] - 1)
        def _finish():
            rows_of_tile = pl.ds(row0, tile)
            for h in range(num_kv_heads):
                out = acc_ref[h, :rows] / l_ref[h, :rows][:, :1]
                for g in range(group):
                    lanes = pl.ds((h * group + g) * head_dim, head_dim)
                    new = out[g * tile : (g + 1) * tile].astype(o_ref.dtype)
                    o_ref[rows_of_tile, lanes] = jnp.where(
                        in_seq[:tile], new, o_ref[rows_of_tile, lanes]
                    )

    def start_first_item(blk, slot):
        """Starts the first KV block of block ``blk``'s first sequence, if it has one."""
        end = block_end_seq_ref[blk]
        s = next_nonempty_seq(block_first_seq_ref[blk], end)

        @pl.when(s < end)
        def _():
            meta = seq_meta(s, blk)
            kv_copies(s, meta["kv_block_lo"], slot, meta, "start")

    def step(carry):
        s, kv_block, slot = carry
        meta = seq_meta(s, block)
        # Prefetch the next (sequence, KV block) into the other slot, then wait for ours.
        more_here = kv_block + 1 < meta["kv_block_hi"]
        s_next = jnp.where(more_here, s, next_nonempty_seq(s + 1, end_seq))
        has_next = s_next < end_seq
        next_meta = seq_meta(clamp_seq(s_next, end_seq), block)
        kv_block_next = jnp.where(more_here, kv_block + 1, next_meta["kv_block_lo"])

        @pl.when(has_next)
        def _():
            kv_copies(s_next, kv_block_next, 1 - slot, next_meta, "start")

        if cross_step:  # the step's last item prefetches the next grid step's first one

            @pl.when(~has_next & (block + 1 < num_blocks))
            def _():
                start_first_item(block + 1, 1 - slot)

        kv_copies(s, kv_block, slot, meta, "wait")

        # The smallest aligned row tile holding all of this sequence's rows in the block.
        first_row = meta["row_lo"] - block_start
        last_row = meta["row_hi"] - 1 - block_start
        for i, tile in enumerate(tiles):
            row0 = first_row // tile * tile
            fits = last_row < row0 + tile
            for smaller in tiles[:i]:
                fits &= last_row >= first_row // smaller * smaller + smaller
            row0 = pl.multiple_of(row0, tile)
            pl.when(fits)(functools.partial(attend, tile, row0, s, kv_block, slot, meta))
        return s_next, kv_block_next, 1 - slot

    s0 = next_nonempty_seq(first_seq, end_seq)
    if cross_step:
        # Grid steps run in order; each one's first KV block was started by the step before.
        first_slot = jnp.where(block == 0, 0, next_slot_ref[0])

        @pl.when(block == 0)
        def _():
            start_first_item(block, 0)

    else:
        first_slot = jnp.int32(0)
        start_first_item(block, 0)

    _, _, last_slot = lax.while_loop(
        lambda carry: carry[0] < end_seq,
        step,
        (s0, seq_meta(clamp_seq(s0, end_seq), block)["kv_block_lo"], first_slot),
    )
    if cross_step:
        next_slot_ref[0] = last_slot

    # Padding tokens: zero rows (the reference's convention), never computed.
    real_end = query_start_ref[num_seqs_ref[0]]

    @pl.when(block_start + bq > real_end)
    def _():
        token = block_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        o_ref[...] = jnp.where(token >= real_end, jnp.zeros((), o_ref.dtype), o_ref[...])


def block_seq_ranges(
    query_start_loc: jax.Array, num_seqs: jax.Array, num_blocks: int, block: int
) -> tuple[jax.Array, jax.Array]:
    """Per block of ``block`` packed tokens: [first, end) of the real sequences it holds."""
    max_num_seqs = query_start_loc.shape[0] - 1
    n = jnp.clip(jnp.reshape(num_seqs, ()), 0, max_num_seqs)
    # Exclusive ends of the real sequences; padding rows may hold anything, so mask them.
    ends = jnp.where(jnp.arange(max_num_seqs) < n, query_start_loc[1:], jnp.iinfo(jnp.int32).max)
    real_end = query_start_loc[n]
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * block
    last = jnp.minimum(starts + block, real_end) - 1
    first = jnp.searchsorted(ends, starts, side="right").astype(jnp.int32)
    end = jnp.searchsorted(ends, last, side="right").astype(jnp.int32) + 1
    end = jnp.where(last >= starts, jnp.minimum(end, n), first)
    return jnp.minimum(first, n), end


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "causal",
        "num_queries_per_block",
        "num_kv_pages_per_block",
        "vmem_limit_bytes",
        "tpu_generation",
        "prefetch_across_steps",
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
    num_queries_per_block: int | None = None,
    num_kv_pages_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    tpu_generation: str | None = None,
    prefetch_across_steps: bool | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Ragged paged attention on TPU; arguments and result as ``reference.ragged_paged_attention``.

    - ``num_queries_per_block``, ``num_kv_pages_per_block``, ``vmem_limit_bytes``: default to
      ``tuning.pick_block_sizes`` for ``tpu_generation`` (a name like ``"v5e"`` or a device kind;
      default: the device's, or ``"v5e"`` in interpret mode).
    - ``prefetch_across_steps``: each grid step prefetches the next step's first KV block, so
      steps must run in order ("arbitrary" grid). Default: on, except on megacore chips (v4,
      v5p), where the grid is "parallel" so that both TensorCores share it.
    - ``interpret``: ``True`` (or a ``pltpu.InterpretParams``) runs the kernel in TPU interpret
      mode on CPU.
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
        implementation="the TPU kernel",
    )
    num_tokens, num_q_heads, head_dim = queries.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    max_num_seqs, pages_per_seq = page_indices.shape
    if interpret is True:
        interpret = pltpu.InterpretParams()
    else:
        tuning.check_smem(max_num_seqs, pages_per_seq)

    tile = tuning.min_row_tile(queries.dtype)
    if tpu_generation is None:
        tpu_generation = "v5e" if interpret else tuning.detect_generation()
    generation = tuning.resolve_generation(tpu_generation)
    if prefetch_across_steps is None:
        prefetch_across_steps = not generation.megacore
    if num_queries_per_block is None or num_kv_pages_per_block is None or vmem_limit_bytes is None:
        picked = tuning.pick_block_sizes(
            num_q_heads,
            num_kv_heads,
            head_dim,
            page_size,
            queries.dtype,
            tpu_generation,
            pages_per_seq=pages_per_seq,
        )
        num_queries_per_block = num_queries_per_block or picked.num_queries_per_block
        num_kv_pages_per_block = num_kv_pages_per_block or picked.num_kv_pages_per_block
        vmem_limit_bytes = vmem_limit_bytes or picked.vmem_limit_bytes
    bq = min(_round_up(num_queries_per_block, tile), _round_up(num_tokens, tile))
    pages_per_block = max(1, min(num_kv_pages_per_block, pages_per_seq))
    num_blocks = -(-num_tokens // bq)
    padded_tokens = num_blocks * bq
    bkv = pages_per_block * page_size
    width_q = num_q_heads * head_dim

    q2 = jnp.pad(queries.reshape(num_tokens, width_q), ((0, padded_tokens - num_tokens), (0, 0)))
    # The pages go in as they are, [pages, page_size, kv_heads, head_dim]: on TPU a reshape to
    # [pages, page_size, kv_heads * head_dim] is a relayout of its tiles, i.e. a copy of the
    # whole cache every layer and step (seen in the TPU compiler's memory analysis). One DMA
    # still moves a whole page, all its KV heads. A single KV head (MQA, or one head per
    # device when tensor parallelism splits the KV heads) goes in as [pages, page_size,
    # head_dim], the same bytes: the compiler lays a [.., page_size, 1, head_dim] array out
    # with its size-1 axis outermost, while a Mosaic operand must be row-major, which pads
    # that axis, so XLA copied the whole cache into the padded form every layer and step
    # (temporaries 2x the cache on v6e); the 3-D view is a bitcast of the compiler's layout.
    page_shape = (bkv, num_kv_heads, head_dim) if num_kv_heads > 1 else (bkv, head_dim)
    if num_kv_heads == 1:
        k_pages = k_pages.reshape(num_pages, page_size, head_dim)
        v_pages = v_pages.reshape(num_pages, page_size, head_dim)
    query_start_loc = query_start_loc.astype(jnp.int32)
    num_seqs = jnp.clip(jnp.reshape(num_seqs, (1,)).astype(jnp.int32), 0, max_num_seqs)
    first_seq, end_seq = block_seq_ranges(query_start_loc, num_seqs, num_blocks, bq)

    kernel = functools.partial(
        _kernel,
        bq=bq,
        # Row tiles a sequence's rows are computed on: a decode's, a short chunk's, the block's.
        tiles=tuple(sorted({min(tile, bq), max(min(tile, bq), _round_up(bq // 4, tile)), bq})),
        cross_step=prefetch_across_steps,
        pages_per_block=pages_per_block,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        max_num_seqs=max_num_seqs,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        sm_scale=float(sm_scale),
        sliding_window=sliding_window,
        soft_cap=None if soft_cap is None else float(soft_cap),
    )
    rows = group * bq
    io_spec = pl.BlockSpec((bq, width_q), lambda i, *_: (i, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6,
        grid=(num_blocks,),
        in_specs=[io_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=io_spec,
        scratch_shapes=[
            pltpu.VMEM((2, *page_shape), k_pages.dtype),
            pltpu.VMEM((2, *page_shape), v_pages.dtype),
            pltpu.SemaphoreType.DMA((2, 2)),
            pltpu.VMEM((num_kv_heads, rows, 128), jnp.float32),
            pltpu.VMEM((num_kv_heads, rows, 128), jnp.float32),
            pltpu.VMEM((num_kv_heads, rows, head_dim), jnp.float32),
            pltpu.SMEM((1,), jnp.int32),
        ],
    )
    # Upper bounds for XLA's scheduler: every token against a full page table, at most the
    # whole cache read once per sequence.
    kv_width = pages_per_seq * page_size
    kv_bytes = min(max_num_seqs * pages_per_seq, num_pages) * 2 * math.prod(k_pages.shape[1:])
    cost = pl.CostEstimate(
        flops=4 * num_tokens * num_q_heads * head_dim * kv_width,
        transcendentals=num_tokens * num_q_heads * kv_width,
        bytes_accessed=2 * queries.size * queries.dtype.itemsize
        + kv_bytes * k_pages.dtype.itemsize,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_tokens, width_q), queries.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary" if prefetch_across_steps else "parallel",),
            vmem_limit_bytes=vmem_limit_bytes,
        ),
        cost_estimate=cost,
        interpret=interpret or False,
        name="ragged_paged_attention",
    )(
        kv_lens.astype(jnp.int32),
        page_indices.astype(jnp.int32).reshape(-1),
        query_start_loc,
        num_seqs,
        first_seq,
        end_seq,
        q2,
        k_pages,
        v_pages,
    )
    return out[:num_tokens].reshape(num_tokens, num_q_heads, head_dim)
