"""The attention call shared by every model: write the step's K/V into the pages, then attend.

Which implementation runs is decided once per process (``TPU_PLUGIN_ATTENTION``):
the Mosaic Pallas kernel on TPU, the pure-jnp reference elsewhere, or the TPU kernel in
interpret mode on CPU for debugging and for end-to-end tests of the kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax

from tpu_kernels.ragged_paged_attention import reference
from tpu_plugin import envs

KVCache = tuple[jax.Array, jax.Array]  # (k_pages, v_pages): [num_pages, page_size, kv_heads, dim]


class AttentionMetadata(NamedTuple):
    """Per-step layout of the ragged batch (see ``tpu_kernels.ragged_paged_attention``)."""

    slot_mapping: jax.Array  # [num_tokens] page * page_size + offset; padding past the end
    kv_lens: jax.Array  # [max_num_seqs]
    page_indices: jax.Array  # [max_num_seqs, pages_per_seq]
    query_start_loc: jax.Array  # [max_num_seqs + 1]
    num_seqs: jax.Array  # [1]


@functools.cache
def attention_kernel() -> Callable[..., jax.Array]:
    """The ragged paged attention function this process uses."""
    choice = envs.attention_impl()
    if choice == "auto":
        choice = "pallas" if jax.default_backend() == "tpu" else "reference"
    if choice == "reference":
        return reference.ragged_paged_attention
    from tpu_kernels.ragged_paged_attention import tpu

    return functools.partial(tpu.ragged_paged_attention, interpret=choice == "pallas-interpret")


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_cache: KVCache,
    metadata: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> tuple[jax.Array, KVCache]:
    """Stores ``k``/``v`` (``[tokens, kv_heads, dim]``) in the cache and attends ``q``."""
    k_pages, v_pages = reference.write_kv_pages(*kv_cache, k, v, metadata.slot_mapping)
    out = attention_kernel()(
        q,
        k_pages,
        v_pages,
        metadata.kv_lens,
        metadata.page_indices,
        metadata.query_start_loc,
        metadata.num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    return out, (k_pages, v_pages)
