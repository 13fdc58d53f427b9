"""The attention call shared by every model: write the step's K/V into the pages, then attend.

Which implementation runs is decided once per process (``TPU_PLUGIN_ATTENTION``):
the Mosaic Pallas kernel on TPU, the Pallas GPU (Triton) kernel on GPU (the reference for shapes
it does not take), the jnp ``xla`` implementation on CPU (key chunks in a loop as long as the
real KV lengths), the pure-jnp reference, or the TPU kernel in interpret mode on CPU for
debugging and for end-to-end tests of the kernel.

:class:`SelfAttention` is the attention block every dense family builds from an
:class:`AttentionSpec` (projections, optional per-head q/k norm, rotary embedding, the call).

Sliding-window layers (Mistral, Phi-3, Gemma 3's local layers, Qwen with ``use_sliding_window``)
keep the KV cache a single full-attention group: vLLM keeps every block of a request, and the
window is enforced by masking in the kernel. That spends memory on keys no query can see any
more, but keeps one page table for all layers (prefix caching and chunked prefill unchanged);
freeing out-of-window blocks needs vLLM's hybrid KV cache groups, not supported yet.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tpu_kernels.ragged_paged_attention import reference, xla
from tpu_plugin import envs
from tpu_plugin.layers.linear import FusedLinear, Linear, grouped_qkv
from tpu_plugin.layers.norm import RMSNorm, rms_norm
from tpu_plugin.layers.rope import RotaryEmbedding

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
    backend = envs.target_platform()  # the TPU when the planner compiles for one
    if choice == "auto":
        # On an H100 the Pallas GPU kernel reads KV at 83-94% of copy bandwidth (2k-8k context
        # decode) against 22-26% for the reference (benchmarks/RESULTS.md).
        choice = "pallas" if backend in ("tpu", "gpu") else "xla"
    if choice == "reference":
        return reference.ragged_paged_attention
    if choice == "xla":
        return xla.ragged_paged_attention
    if choice == "pallas" and backend == "gpu":
        return _gpu_kernel_or_reference
    from tpu_kernels.ragged_paged_attention import tpu
    from tpu_plugin.parallel.shard_kernels import sharded_attention

    # Per device under tensor parallelism: Mosaic kernels are not partitioned by XLA.
    kernel = functools.partial(tpu.ragged_paged_attention, interpret=choice == "pallas-interpret")
    return sharded_attention(kernel)


def page_table_width_bucketed() -> bool:
    """Whether the runner should bucket the page table's width for this process's attention.

    The reference's work is ``tokens x width``, so a short-context step must get a narrow
    table; the other implementations take the table's width as a bound only, but the Pallas
    kernels' block sizes are tuned per width (tuning.py) and stay bucketed. The ``xla``
    implementation walks the real KV lengths: the runner passes the full width and compiles
    one program per token bucket instead of one per (tokens, width) pair.
    """
    return attention_kernel() is not xla.ragged_paged_attention


def _gpu_kernel_or_reference(q: jax.Array, k_pages: jax.Array, *args, **kwargs) -> jax.Array:
    """The Pallas GPU kernel where its tile rules allow the shapes (power-of-two head_dim and
    page size), the reference otherwise (e.g. head_dim 80 or 96); decided at trace time."""
    from tpu_kernels.ragged_paged_attention import gpu

    if gpu.supports(q.shape[-1], k_pages.shape[1]):
        return gpu.ragged_paged_attention(q, k_pages, *args, **kwargs)
    return reference.ragged_paged_attention(q, k_pages, *args, **kwargs)


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


def encoder_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_cache: KVCache,
    md: AttentionMetadata,
    *,
    sm_scale: float,
) -> tuple[jax.Array, KVCache]:
    """Bidirectional attention of an encoder step: every input is whole in the step, so its
    keys and values are the step's own and the pages are neither read nor written.

    The page table's width bounds the longest input (``tpu_kernels.bidirectional_attention``).
    """
    from tpu_kernels.bidirectional_attention.xla import bidirectional_attention

    max_seq_len = md.page_indices.shape[1] * kv_cache[0].shape[1]
    out = bidirectional_attention(
        q, k, v, md.query_start_loc, md.num_seqs, sm_scale=sm_scale, max_seq_len=max_seq_len
    )
    return out, kv_cache


def sliding_window_of(hf_config: Any, layer_idx: int) -> int | None:
    """Layer ``layer_idx``'s window as Hugging Face applies it, or ``None`` for full attention.

    With ``layer_types`` (Gemma 3, Qwen2/3) only ``"sliding_attention"`` layers slide; without
    it (Mistral, Phi-3) ``sliding_window`` applies to every layer. In transformers 5.19 a query
    at position ``p`` sees keys ``p - W < k <= p``, i.e. ``W`` keys counting itself
    (``masking_utils.sliding_window_overlay``), which is exactly the kernel's
    ``sliding_window=W`` convention, so the value passes through unchanged.
    """
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is None:
        return window
    kind = layer_types[layer_idx]
    if kind == "full_attention":
        return None
    if kind == "sliding_attention":
        return window
    raise ValueError(
        f"layer type {kind!r} (layer {layer_idx}) is not supported; supported: "
        "full_attention, sliding_attention"
    )


@dataclass(frozen=True)
class AttentionSpec:
    """Everything that distinguishes one family's (and one layer's) attention block.

    Frozen and hashable: the spec is static data of the module, known at trace time.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RotaryEmbedding
    qkv_bias: bool = False
    o_bias: bool = False
    # Per-head RMSNorm of q and k before rope (Qwen3, Gemma 3): its epsilon, None for none.
    qk_norm_eps: float | None = None
    qk_norm_offset: float = 0.0  # 1.0 for Gemma's (1 + weight) norm
    sm_scale: float | None = None  # None: head_dim ** -0.5
    sliding_window: int | None = None
    soft_cap: float | None = None


class SelfAttention(nnx.Module):
    """Fused q/k/v projection, optional q/k norm, rope, paged attention, output projection.

    ``qkv_proj`` is one matmul whose weight ``[kv_heads, (group + 2) * head_dim, hidden]``
    the loader builds from the checkpoint's ``q_proj``/``k_proj``/``v_proj`` (or cuts from
    Phi-3's fused ``qkv_proj``), grouped by KV head so that tensor parallelism splits it into
    whole heads (:func:`tpu_plugin.layers.linear.grouped_qkv`); q/k norm and rope then run on
    the query and key heads together (:meth:`_project`). The other parameter names follow
    Hugging Face (``o_proj``, ``q_norm``, ``k_norm``).
    """

    def __init__(self, spec: AttentionSpec, dtype: jnp.dtype):
        self.spec = spec
        fusion = grouped_qkv(spec.num_heads, spec.num_kv_heads, spec.head_dim)
        self.qkv_proj = FusedLinear(spec.hidden_size, fusion, dtype, bias=spec.qkv_bias)
        q_dim = spec.num_heads * spec.head_dim
        self.o_proj = Linear(q_dim, spec.hidden_size, dtype, bias=spec.o_bias)
        if spec.qk_norm_eps is not None:
            eps, offset = spec.qk_norm_eps, spec.qk_norm_offset
            self.q_norm = RMSNorm(spec.head_dim, eps, dtype, weight_offset=offset)
            self.k_norm = RMSNorm(spec.head_dim, eps, dtype, weight_offset=offset)
        else:
            self.q_norm = self.k_norm = None

    def __call__(
        self, x: jax.Array, positions: jax.Array, kv_cache: KVCache, md: AttentionMetadata
    ) -> tuple[jax.Array, KVCache]:
        spec = self.spec
        q, k, v = self._project(x, positions)
        out, kv_cache = paged_attention(
            q,
            k,
            v,
            kv_cache,
            md,
            sm_scale=spec.sm_scale if spec.sm_scale is not None else spec.head_dim**-0.5,
            sliding_window=spec.sliding_window,
            soft_cap=spec.soft_cap,
        )
        return self.o_proj(out.reshape(x.shape[0], -1)), kv_cache

    def _project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, ...]:
        """``q [T, heads, D]``, ``k``, ``v [T, kv_heads, D]``: projected, normed, rotated.

        The fused result is ``[T, kv_heads, (group + 2) * D]``, each group's query heads
        followed by its key head and its value head, so the query and key heads of a group are
        adjacent: their q/k norm and rotary embedding run on that one slice, ``[T, kv_heads,
        group + 1, D]``, as one computation (one kernel instead of one per tensor), with each
        group's own heads on the device that holds them under tensor parallelism.
        """
        spec, tokens = self.spec, x.shape[0]
        kv_heads, dim = spec.num_kv_heads, spec.head_dim
        group = spec.num_heads // kv_heads
        y = self.qkv_proj(x)
        qk = y[..., : (group + 1) * dim].reshape(tokens, kv_heads, group + 1, dim)
        v = y[..., (group + 1) * dim :]
        if self.q_norm is not None:
            # q_norm's weight on the group's query heads, k_norm's on its key head
            q_w, k_w = self.q_norm.weight[...], self.k_norm.weight[...]
            weight = jnp.concatenate([jnp.broadcast_to(q_w, (group, dim)), k_w[None]])
            qk = rms_norm(qk, weight, spec.qk_norm_eps, spec.qk_norm_offset)
        qk = spec.rope(qk.reshape(tokens, kv_heads * (group + 1), dim), positions)
        qk = qk.reshape(tokens, kv_heads, group + 1, dim)
        q = qk[:, :, :group].reshape(tokens, spec.num_heads, dim)
        return q, qk[:, :, group], v
