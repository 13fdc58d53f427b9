"""Argument checks shared by every ragged paged attention implementation.

The reference, the TPU kernel and the GPU kernel take the same arguments (see the package doc);
they check them here, once, so that a bad call fails the same way, with the same sentence,
whichever implementation the backend picked. Checks run at trace time on static shapes.
"""

from __future__ import annotations

import jax


def check_arguments(
    queries: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    query_start_loc: jax.Array,
    *,
    sliding_window: int | None,
    causal: bool = True,
    implementation: str | None = None,
) -> int:
    """Raises ``ValueError`` naming the fix for inconsistent shapes or options; returns the
    group (query heads per KV head).

    ``implementation`` names a kernel that attends causally only (``"the TPU kernel"``): a
    non-causal call to it fails here with that name rather than computing the wrong mask.
    """
    if queries.ndim != 3:
        raise ValueError(
            f"queries must be [num_tokens, num_q_heads, head_dim], got shape {queries.shape}"
        )
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            "k_pages and v_pages must both be [num_pages, page_size, num_kv_heads, head_dim], "
            f"got {k_pages.shape} and {v_pages.shape}"
        )
    num_q_heads, head_dim = queries.shape[1:]
    num_kv_heads = k_pages.shape[2]
    if k_pages.shape[3] != head_dim:
        raise ValueError(f"queries have head_dim {head_dim} but the KV pages {k_pages.shape[3]}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not group over {num_kv_heads} KV heads")
    if page_indices.ndim != 2:
        raise ValueError(
            f"page_indices must be [max_num_seqs, pages_per_seq], got shape {page_indices.shape}"
        )
    max_num_seqs = page_indices.shape[0]
    if kv_lens.shape != (max_num_seqs,) or query_start_loc.shape != (max_num_seqs + 1,):
        raise ValueError(
            f"kv_lens must be [max_num_seqs] and query_start_loc [max_num_seqs + 1] with "
            f"max_num_seqs = {max_num_seqs} (page_indices' rows), got {kv_lens.shape} and "
            f"{query_start_loc.shape}"
        )
    if not causal and implementation is not None:
        raise ValueError(
            f"{implementation} attends causally only; bidirectional (encoder) attention runs "
            "through tpu_kernels.ragged_paged_attention.reference"
        )
    if not causal and sliding_window is not None:
        raise ValueError("a sliding window needs causal attention; pass causal=True or no window")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive number of keys, got {sliding_window}")
    return num_q_heads // num_kv_heads
