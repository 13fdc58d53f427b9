"""Bidirectional attention of whole sequences (``tpu_kernels.bidirectional_attention``) against
its specification: the paged reference with ``causal=False`` and the naive NumPy definition.

Batches hold whole sequences only (``kv_len == query_len``, the encoder case), packed and
padded as the runner pads them; the keys and values the implementation reads are the step's
own, taken from the same pages the reference reads.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from rpa_inputs import check_padding_rows_zero, make_batch, naive_attention, rel_err, seed_of

from tpu_kernels.bidirectional_attention.xla import bidirectional_attention

WHOLE = {
    "one": [(23, 23)],
    "ragged": [(23, 23), (1, 1), (40, 40), (16, 16), (7, 7)],
    "many_short": [(n, n) for n in (3, 1, 5, 2, 8, 1, 4, 6, 2, 3)],
}


def step_kv(batch) -> tuple[np.ndarray, np.ndarray]:
    """The step's own keys/values, packed like its queries (from the sequences' pages)."""
    page_size = batch.k_pages.shape[1]
    k = np.zeros((batch.queries.shape[0], *batch.k_pages.shape[2:]), batch.k_pages.dtype)
    v = np.zeros_like(k)
    for s in range(int(batch.num_seqs[0])):
        start, end = int(batch.query_start_loc[s]), int(batch.query_start_loc[s + 1])
        for t in range(start, end):
            page = batch.page_indices[s, (t - start) // page_size]
            k[t] = batch.k_pages[page, (t - start) % page_size]
            v[t] = batch.v_pages[page, (t - start) % page_size]
    return k, v


@pytest.mark.parametrize("block", [4, 128])
@pytest.mark.parametrize("mix", sorted(WHOLE))
def test_matches_the_definition(mix, block):
    seqs = WHOLE[mix]
    batch = make_batch(seed_of("bidir", mix, block), seqs, num_q_heads=4, num_kv_heads=2)
    k, v = step_kv(batch)
    k[batch.num_real_tokens :] = np.nan  # padding tokens' keys/values must not leak
    v[batch.num_real_tokens :] = np.nan
    got = bidirectional_attention(
        jnp.asarray(batch.queries),
        jnp.asarray(k),
        jnp.asarray(v),
        jnp.asarray(batch.query_start_loc),
        jnp.asarray(batch.num_seqs),
        sm_scale=0.2,
        max_seq_len=max(n for n, _ in seqs),
        block=block,
    )
    want = naive_attention(batch, sm_scale=0.2, causal=False)
    assert rel_err(got, want, batch.num_real_tokens) <= 1e-5
    check_padding_rows_zero(got, batch.num_real_tokens)
