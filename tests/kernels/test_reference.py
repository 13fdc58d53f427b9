"""The pure-jnp reference of ragged paged attention against the definition (NumPy, float64).

Relative error is max|reference - naive| / max|naive| over the real token rows; padding token
rows must be exactly zero. Every batch is padded with hostile garbage (see ``rpa_inputs``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from rpa_inputs import (
    MIXES,
    check_padding_rows_zero,
    make_batch,
    naive_attention,
    reference_attention,
    rel_err,
    seed_of,
)

from tpu_kernels.ragged_paged_attention import reference

FP32_TOL = 1e-5
BF16_TOL = 1e-2


def check(batch, tol, **kwargs):
    want = naive_attention(batch, **kwargs)
    got = reference_attention(batch, **kwargs)
    assert got.dtype == jnp.dtype(batch.dtype)
    assert got.shape == batch.queries.shape
    real = batch.num_real_tokens
    assert np.all(np.isfinite(np.asarray(got.astype(jnp.float32))))
    assert rel_err(got, want, real) <= tol
    check_padding_rows_zero(got, real)


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_batch_mixes(mix):
    seqs = MIXES[mix]
    batch = make_batch(seed_of("mix", mix), seqs, max_num_seqs=len(seqs) + 3, num_tokens=None)
    check(batch, FP32_TOL, sm_scale=128**-0.5)


@pytest.mark.parametrize("group", range(1, 9))
def test_gqa_ratios(group):
    batch = make_batch(
        seed_of("gqa", group),
        [(1, 20), (9, 30), (5, 5)],
        num_q_heads=2 * group,
        num_kv_heads=2,
        head_dim=64,
    )
    check(batch, FP32_TOL, sm_scale=0.125)


@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_sliding_window(window):
    batch = make_batch(seed_of("window", window), MIXES["mixed"], page_size=8)
    check(batch, FP32_TOL, sm_scale=0.1, sliding_window=window)


@pytest.mark.parametrize("soft_cap", [1.0, 30.0])
def test_soft_cap(soft_cap):
    batch = make_batch(seed_of("cap", soft_cap), MIXES["mixed"])
    check(batch, FP32_TOL, sm_scale=0.5, soft_cap=soft_cap)


def test_window_and_soft_cap_bf16():
    batch = make_batch(seed_of("bf16"), MIXES["mixed"], dtype=jnp.bfloat16, head_dim=256)
    check(batch, BF16_TOL, sm_scale=0.0625, sliding_window=20, soft_cap=20.0)


@pytest.mark.parametrize("token_block", [1, 4, 16, 64])
def test_token_block_does_not_change_numbers(token_block):
    batch = make_batch(seed_of("block", token_block), MIXES["mixed"])
    want = naive_attention(batch, sm_scale=0.1)
    got = reference_attention(batch, sm_scale=0.1, token_block=token_block)
    assert rel_err(got, want, batch.num_real_tokens) <= FP32_TOL


def test_padding_is_ignored():
    """Changing any padding value (tokens, sequence slots, spare table entries) changes nothing."""
    seqs = MIXES["mixed"]
    a = make_batch(seed_of("pad", 1), seqs, max_num_seqs=12, num_tokens=130)
    b = make_batch(seed_of("pad", 2), seqs, max_num_seqs=12, num_tokens=130)
    # Same real data in both, different padding.
    real = a.num_real_tokens
    b.queries[:real] = a.queries[:real]
    b.k_pages, b.v_pages = a.k_pages, a.v_pages
    n = len(seqs)
    for s in range(n):
        pages = -(-a.kv_lens[s] // a.k_pages.shape[1])
        b.page_indices[s, :pages] = a.page_indices[s, :pages]
    assert not np.array_equal(a.page_indices[n:], b.page_indices[n:])
    assert not np.array_equal(a.query_start_loc[n + 1 :], b.query_start_loc[n + 1 :])
    out_a = reference_attention(a, sm_scale=0.1)
    out_b = reference_attention(b, sm_scale=0.1)
    np.testing.assert_array_equal(np.asarray(out_a[:real]), np.asarray(out_b[:real]))
    check_padding_rows_zero(out_a, real)
    check_padding_rows_zero(out_b, real)


def test_unsorted_padding_query_start_loc():
    """Slots past num_seqs in query_start_loc may be anything, even smaller than real offsets."""
    batch = make_batch(seed_of("qsl"), [(3, 3), (4, 9), (1, 2)], max_num_seqs=6, num_tokens=10)
    batch.query_start_loc[4:] = [0, 1, 2]
    check(batch, FP32_TOL, sm_scale=0.3)


def test_no_real_sequences():
    batch = make_batch(seed_of("empty"), [], max_num_seqs=4, num_tokens=8)
    out = reference_attention(batch, sm_scale=0.1)
    check_padding_rows_zero(out, 0)


def test_zero_length_sequence_in_batch():
    batch = make_batch(seed_of("zero_len"), [(3, 10), (0, 0), (0, 7), (2, 2)], num_tokens=7)
    check(batch, FP32_TOL, sm_scale=0.3)


def test_token_layout():
    kv_lens = jnp.array([10, 3, 7, 99], jnp.int32)
    query_start_loc = jnp.array([0, 2, 5, 6, 1], jnp.int32)  # slot 3 is padding
    seq, position, real = reference.token_layout(kv_lens, query_start_loc, jnp.array([3]), 8)
    np.testing.assert_array_equal(np.asarray(real), [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(seq)[:6], [0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(np.asarray(position)[:6], [8, 9, 0, 1, 2, 6])


@pytest.mark.parametrize("pad_slot", ["past_end", "negative"])
def test_write_kv_pages(pad_slot):
    rng = np.random.default_rng(seed_of("write", pad_slot))
    num_pages, page_size, kv_heads, head_dim = 6, 4, 2, 8
    k_pages = rng.standard_normal((num_pages, page_size, kv_heads, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal(k_pages.shape).astype(np.float32)
    num_tokens, num_real = 9, 6
    new_k = rng.standard_normal((num_tokens, kv_heads, head_dim)).astype(np.float32)
    new_v = rng.standard_normal(new_k.shape).astype(np.float32)
    slots = rng.permutation(num_pages * page_size)[:num_tokens].astype(np.int32)
    total = num_pages * page_size
    slots[num_real:] = [total, total + 5, 10**6] if pad_slot == "past_end" else [-1, -1, -2]

    got_k, got_v = reference.write_kv_pages(
        jnp.asarray(k_pages), jnp.asarray(v_pages), new_k, new_v, jnp.asarray(slots)
    )
    want_k, want_v = k_pages.copy(), v_pages.copy()
    for t in range(num_real):
        page, offset = divmod(int(slots[t]), page_size)
        want_k[page, offset] = new_k[t]
        want_v[page, offset] = new_v[t]
    np.testing.assert_array_equal(np.asarray(got_k), want_k)
    np.testing.assert_array_equal(np.asarray(got_v), want_v)


def test_write_then_attend_sees_current_tokens():
    """A decode step: write the new token's K/V, then attention reads it at position kv_len-1."""
    batch = make_batch(seed_of("write_attend"), [(1, 18), (1, 5)], num_tokens=2, poison=False)
    page_size = batch.k_pages.shape[1]
    rng = np.random.default_rng(0)
    new_k = rng.standard_normal((2, 2, 128)).astype(np.float32)
    new_v = rng.standard_normal((2, 2, 128)).astype(np.float32)
    slots = np.array(
        [
            batch.page_indices[s, (batch.kv_lens[s] - 1) // page_size] * page_size
            + (batch.kv_lens[s] - 1) % page_size
            for s in range(2)
        ],
        np.int32,
    )
    k, v = reference.write_kv_pages(
        jnp.asarray(batch.k_pages), jnp.asarray(batch.v_pages), new_k, new_v, slots
    )
    batch.k_pages, batch.v_pages = np.asarray(k), np.asarray(v)
    check(batch, FP32_TOL, sm_scale=0.1)


@pytest.mark.parametrize("mix", ["prefill_only", "chunked_prefill", "mixed"])
def test_bidirectional(mix):
    """``causal=False`` (encoders): every token sees its whole sequence, later keys included,
    and still nothing of other sequences or of the padding."""
    batch = make_batch(seed_of("bidirectional", mix), MIXES[mix], page_size=8)
    check(batch, FP32_TOL, sm_scale=0.2, causal=False)
    causal = reference_attention(batch, sm_scale=0.2)
    bidirectional = reference_attention(batch, sm_scale=0.2, causal=False)
    # A sequence's last token sees every key either way; its earlier tokens do not.
    last = int(batch.query_start_loc[1]) - 1
    np.testing.assert_allclose(bidirectional[last], causal[last], rtol=1e-6, atol=1e-6)
    assert not np.allclose(bidirectional[: last - 1], causal[: last - 1])


def test_bidirectional_refuses_a_window():
    batch = make_batch(seed_of("bidirectional-window"), MIXES["prefill_only"])
    with pytest.raises(ValueError, match="sliding window needs causal attention"):
        reference_attention(batch, sm_scale=0.1, causal=False, sliding_window=4)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_pallas_kernels_refuse_bidirectional(kernel):
    """The Pallas kernels mask causally only: asked for more, they say so by name."""
    import importlib

    module = importlib.import_module(f"tpu_kernels.ragged_paged_attention.{kernel}")
    batch = make_batch(seed_of("refuse", kernel), MIXES["prefill_only"])
    with pytest.raises(ValueError, match=f"the {kernel.upper()} kernel attends causally only"):
        module.ragged_paged_attention(*batch.args(), sm_scale=0.1, causal=False, interpret=True)
