"""KV cache pages as JAX arrays: one ``(k_pages, v_pages)`` pair per attention layer.

vLLM's KV cache manager owns the bookkeeping (which block belongs to which request, prefix
sharing); this module only describes the per-layer page format to vLLM and allocates the
pages. A vLLM block id is directly the page index in every layer's arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheSpec

from tpu_plugin.layers.attention import KVCache

TORCH_TO_JAX_DTYPE = {
    torch.float32: jnp.float32,
    torch.bfloat16: jnp.bfloat16,
    torch.float16: jnp.float16,
}


def layer_name(index: int) -> str:
    return f"model.layers.{index}.self_attn.attn"


def kv_cache_spec(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> dict[str, KVCacheSpec]:
    """One full-attention spec per layer, in the page format :func:`allocate` creates."""
    spec = FullAttentionSpec(
        block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_dim, dtype=dtype
    )
    return {layer_name(i): spec for i in range(num_layers)}


def allocate(
    config: KVCacheConfig, num_layers: int, num_kv_heads: int, head_dim: int, dtype: Any
) -> list[KVCache]:
    """Zeroed pages for every layer, as many blocks as vLLM's budget gave."""
    if len(config.kv_cache_groups) != 1:
        raise ValueError(
            f"tpu-plugin supports one KV cache group, got {len(config.kv_cache_groups)} "
            "(hybrid sliding-window/full models are not supported yet)"
        )
    block_size = config.kv_cache_groups[0].kv_cache_spec.block_size
    shape = (config.num_blocks, block_size, num_kv_heads, head_dim)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype))
    return [(zeros(), zeros()) for _ in range(num_layers)]


@jax.jit
def _copy_pages(kv_caches: list[KVCache], src: jax.Array, dst: jax.Array) -> list[KVCache]:
    return [(k.at[dst].set(k[src]), v.at[dst].set(v[src])) for k, v in kv_caches]


def copy_blocks(kv_caches: list[KVCache], copies: list[Any]) -> list[KVCache]:
    """Applies vLLM's copy-on-write block copies (``src_block_id -> dst_block_id``)."""
    src = jnp.asarray([c.src_block_id for c in copies], jnp.int32)
    dst = jnp.asarray([c.dst_block_id for c in copies], jnp.int32)
    return _copy_pages(kv_caches, src, dst)
