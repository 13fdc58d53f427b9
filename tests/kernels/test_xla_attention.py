"""The CPU implementation (``xla.py``: key chunks in a loop whose length follows the real KV
lengths) against the definition, on the same hostile batches as the reference."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from rpa_inputs import (
    MIXES,
    PADDING_CASES,
    check_padding_rows_zero,
    make_batch,
    naive_attention,
    rel_err,
    seed_of,
)

from tpu_kernels.ragged_paged_attention import reference, xla

FP32_TOL = 1e-5
BF16_TOL = 1e-2


def check(batch, tol, **kwargs):
    options = {k: kwargs.pop(k) for k in ("token_block", "kv_chunk") if k in kwargs}
    want = naive_attention(batch, **kwargs)
    got = xla.ragged_paged_attention(*batch.args(), **kwargs, **options)
    assert got.dtype == jnp.dtype(batch.dtype) and got.shape == batch.queries.shape
    real = batch.num_real_tokens
    assert np.all(np.isfinite(np.asarray(got.astype(jnp.float32))))
    if real:
        assert rel_err(got, want, real) <= tol
    check_padding_rows_zero(got, real)
    return got


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_batch_mixes(mix):
    """One-page chunks: every batch walks several loop iterations."""
    seqs = MIXES[mix]
    batch = make_batch(seed_of("xla", mix), seqs, max_num_seqs=len(seqs) + 3)
    check(batch, FP32_TOL, sm_scale=128**-0.5, kv_chunk=16)


@pytest.mark.parametrize("kv_chunk", [32, 128, 4096])
def test_chunk_sizes(kv_chunk):
    """Chunks of several pages, and one wider than the page table (clipped to it)."""
    batch = make_batch(seed_of("xla-chunk", kv_chunk), MIXES["mixed"])
    check(batch, FP32_TOL, sm_scale=0.1, kv_chunk=kv_chunk)


@pytest.mark.parametrize("group", [1, 3, 8])
def test_gqa_ratios(group):
    batch = make_batch(
        seed_of("xla-gqa", group),
        [(1, 20), (9, 30), (5, 5)],
        num_q_heads=2 * group,
        num_kv_heads=2,
        head_dim=64,
    )
    check(batch, FP32_TOL, sm_scale=0.125)


@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_sliding_window(window):
    """Windows shorter and longer than a chunk: the walk starts at the first visible chunk."""
    batch = make_batch(seed_of("xla-window", window), MIXES["mixed"], page_size=8)
    check(batch, FP32_TOL, sm_scale=0.1, sliding_window=window, kv_chunk=16)


@pytest.mark.parametrize("soft_cap", [1.0, 30.0])
def test_soft_cap(soft_cap):
    batch = make_batch(seed_of("xla-cap", soft_cap), MIXES["mixed"])
    check(batch, FP32_TOL, sm_scale=0.5, soft_cap=soft_cap)


def test_window_and_soft_cap_bf16():
    batch = make_batch(seed_of("xla-bf16"), MIXES["mixed"], dtype=jnp.bfloat16, head_dim=256)
    check(batch, BF16_TOL, sm_scale=0.0625, sliding_window=20, soft_cap=20.0)


@pytest.mark.parametrize("name,seqs,max_num_seqs,num_tokens,sm_scale", PADDING_CASES)
def test_padding(name, seqs, max_num_seqs, num_tokens, sm_scale):
    batch = make_batch(
        seed_of("xla-pad", name), seqs, max_num_seqs=max_num_seqs, num_tokens=num_tokens
    )
    check(batch, FP32_TOL, sm_scale=sm_scale)


@pytest.mark.parametrize("token_block", [1, 4, 16, 64])
def test_blocks_mixing_sequences_and_single_sequence_blocks(token_block):
    """Blocks of one prefill (the shared-gather branch) and blocks spanning several sequences
    (the per-token branch) in one call, at every block size."""
    batch = make_batch(seed_of("xla-block", token_block), [(40, 70), (1, 9), (3, 3), (33, 33)])
    check(batch, FP32_TOL, sm_scale=0.1, token_block=token_block)


def test_width_costs_nothing_and_changes_nothing():
    """The page table padded with garbage to 8x its width gives the same numbers (the runner
    always passes the full width on CPU); the reference agrees."""
    narrow = make_batch(seed_of("xla-width"), MIXES["chunked_prefill"])
    wide = dataclasses.replace(narrow)
    rows, width = narrow.page_indices.shape
    garbage = np.random.default_rng(0).integers(0, narrow.k_pages.shape[0], (rows, 7 * width))
    wide.page_indices = np.concatenate([narrow.page_indices, garbage.astype(np.int32)], axis=1)
    out_narrow = check(narrow, FP32_TOL, sm_scale=0.2)
    out_wide = check(wide, FP32_TOL, sm_scale=0.2)
    real = narrow.num_real_tokens
    want = reference.ragged_paged_attention(*wide.args(), sm_scale=0.2)
    assert rel_err(out_wide, want, real) <= FP32_TOL
    np.testing.assert_allclose(np.asarray(out_narrow), np.asarray(out_wide), rtol=0, atol=1e-6)
