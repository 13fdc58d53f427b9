"""KV cache pages as JAX arrays: one ``(k_pages, v_pages)`` pair per attention layer.

Models with multi-head latent attention (DeepSeek-V3) say so through the optional class hook
``kv_cache_layout(cfg) -> (num_kv_heads, head_dim, latent)``; with ``latent`` a layer's cache is
one page array (the compressed latent and rotary key, vLLM's ``MLAAttentionSpec``), no pair.

vLLM's KV cache manager owns the bookkeeping (which block belongs to which request, prefix
sharing); this module only describes the per-layer page format to vLLM and allocates the
pages. A vLLM block id is directly the page index in every layer's arrays.

``--kv-cache-dtype fp8`` stores e4m3 pages (the model's dtype otherwise): vLLM's budget counts
one byte a value, so it holds twice the tokens of bf16 pages (``runner.kv_dtype``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheSpec,
    MLAAttentionSpec,
)

from tpu_plugin.layers.attention import KVCache

TORCH_TO_JAX_DTYPE = {
    torch.float32: jnp.float32,
    torch.bfloat16: jnp.bfloat16,
    torch.float16: jnp.float16,
}


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype vLLM sizes a page with: the model's, or e4m3 for an fp8 cache (one
    byte a value, so the same budget holds twice the bf16 tokens)."""
    if jnp.dtype(dtype) == jnp.float8_e4m3fn:
        return torch.float8_e4m3fn
    return next(t for t, j in TORCH_TO_JAX_DTYPE.items() if jnp.dtype(j) == jnp.dtype(dtype))


class CacheLayout(NamedTuple):
    """One layer's pages: ``[num_pages, page_size, num_kv_heads, head_dim]``, as a ``(k, v)``
    pair, or as a single array when ``latent`` (MLA: one latent "head", no separate V)."""

    num_kv_heads: int
    head_dim: int
    latent: bool = False


def cache_layout(hf_config: Any) -> CacheLayout:
    """The page layout of the model's JAX port: its ``kv_cache_layout`` hook, else K/V pairs
    of ``num_key_value_heads`` x ``head_dim``."""
    from tpu_plugin import envs
    from tpu_plugin.models import registry
    from tpu_plugin.models.llama import head_dim_of

    hook = None
    if envs.model_impl() != "torchax":
        try:
            model_class = registry.resolve_model_class(list(hf_config.architectures or []))
            hook = getattr(model_class, "kv_cache_layout", None)
        except registry.UnsupportedModelError:
            pass
    if hook is not None:  # e.g. MLA's latent pages; encoders, whose configs have no KV heads
        return CacheLayout(*hook(hf_config))
    return CacheLayout(hf_config.num_key_value_heads, head_dim_of(hf_config))


def layer_name(index: int) -> str:
    return f"model.layers.{index}.self_attn.attn"


def kv_cache_spec(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    latent: bool = False,
) -> dict[str, KVCacheSpec]:
    """One full-attention spec per layer, in the page format :func:`allocate` creates
    (``latent``: vLLM's MLA spec, whose page holds ``head_dim`` values per token, no V)."""
    spec_class = MLAAttentionSpec if latent else FullAttentionSpec
    spec = spec_class(
        block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_dim, dtype=dtype
    )
    return {layer_name(i): spec for i in range(num_layers)}


def allocate(
    config: KVCacheConfig,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: Any,
    sharding: Callable[[tuple[int, ...]], Any] | None = None,
    latent: bool = False,
) -> list[KVCache] | list[jax.Array]:
    """Zeroed pages for every layer, as many blocks as vLLM's budget gave.

    ``sharding(shape)`` places the pages on the device mesh (KV heads split over the devices
    when they divide, see :mod:`tpu_plugin.parallel.sharding`); each device allocates only its
    own shard. ``latent`` (MLA) gives one page array per layer instead of a ``(k, v)`` pair.
    """
    if len(config.kv_cache_groups) != 1:
        raise ValueError(
            f"tpu-plugin supports one KV cache group, got {len(config.kv_cache_groups)} "
            "(hybrid sliding-window/full models are not supported yet)"
        )
    block_size = config.kv_cache_groups[0].kv_cache_spec.block_size
    shape = (config.num_blocks, block_size, num_kv_heads, head_dim)
    out_sharding = sharding(shape) if sharding is not None else None
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=out_sharding)
    return _per_layer(zeros, num_layers, latent)


def abstract_pages(
    num_blocks: int,
    block_size: int,
    num_layers: int,
    layout: CacheLayout,
    dtype: Any,
    sharding: Callable[[tuple[int, ...]], Any],
) -> list[KVCache] | list[jax.ShapeDtypeStruct]:
    """The pages :func:`allocate` would create, as ``jax.ShapeDtypeStruct`` with their
    shardings: the KV argument of an ahead-of-time compile (the TPU planner), no memory."""
    shape = (num_blocks, block_size, layout.num_kv_heads, layout.head_dim)
    page = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding(shape))
    return _per_layer(lambda: page, num_layers, layout.latent)


def _per_layer(make: Callable[[], Any], num_layers: int, latent: bool) -> list:
    """One page array per layer (MLA's latent cache) or a ``(k, v)`` pair per layer."""
    if latent:
        return [make() for _ in range(num_layers)]
    return [(make(), make()) for _ in range(num_layers)]


@jax.jit
def _copy_pages(kv_caches: list[KVCache], src: jax.Array, dst: jax.Array) -> list[KVCache]:
    # Every page array (K, V, or an MLA layer's single latent array) gets the same copies.
    return jax.tree.map(lambda pages: pages.at[dst].set(pages[src]), kv_caches)


def copy_blocks(kv_caches: list[KVCache], copies: list[Any]) -> list[KVCache]:
    """Applies vLLM's copy-on-write block copies (``src_block_id -> dst_block_id``)."""
    src = jnp.asarray([c.src_block_id for c in copies], jnp.int32)
    dst = jnp.asarray([c.dst_block_id for c in copies], jnp.int32)
    return _copy_pages(kv_caches, src, dst)
