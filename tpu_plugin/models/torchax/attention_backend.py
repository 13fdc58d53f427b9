"""vLLM attention backend for torchax models: every attention layer calls the plugin's kernel.

vLLM's ``Attention`` layer hands ``query``/``key``/``value`` to its backend's ``AttentionImpl``
(``unified_attention_with_output``, found through the forward context). Inside a torchax trace
those tensors wrap JAX tracers, so this impl unwraps them and calls
:func:`tpu_plugin.layers.attention.paged_attention` — the same KV write and ragged paged
attention (reference on CPU, Pallas on TPU/GPU) the native JAX models use. There is no second
attention implementation.

The step's KV pages and :class:`AttentionMetadata` are JAX values of the jitted step, not torch
state, so they travel in a :class:`TorchaxAttentionStep` passed to vLLM's
``set_forward_context`` as the attention metadata; each layer reads its pages from it by layer
name and puts the updated pages back, and the jitted step returns them afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import jax
import torch
from torchax.interop import jax_view, torch_view
from vllm.v1.attention.backend import AttentionBackend, AttentionImpl, AttentionType
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

from tpu_plugin.layers.attention import AttentionMetadata, KVCache, paged_attention

BACKEND_NAME = "CUSTOM"  # vLLM's enum slot for an out-of-tree backend
BACKEND_QUALNAME = f"{__name__}.TorchaxPagedAttentionBackend"


@dataclass
class TorchaxAttentionStep:
    """One step's attention inputs for every layer: the metadata and the per-layer pages."""

    metadata: AttentionMetadata
    kv_caches: dict[str, KVCache] = field(default_factory=dict)


class TorchaxPagedAttentionImpl(AttentionImpl):
    """Writes the step's K/V into the layer's pages and attends, in JAX."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra: Any,
    ) -> None:
        # The model is built at start-up, so these raise before any request is served.
        if alibi_slopes is not None:
            raise NotImplementedError(
                "ALiBi attention is not supported by the ragged paged attention kernel; "
                "use a model with rotary or learned positions"
            )
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(
                f"attention type {attn_type!r} is not supported on the torchax path "
                "(decoder self-attention only)"
            )
        if kv_sharing_target_layer_name is not None:
            raise NotImplementedError("cross-layer KV sharing is not supported by tpu-plugin")
        if kv_cache_dtype not in ("auto", None):
            raise NotImplementedError("tpu-plugin supports kv_cache_dtype='auto' only")
        if extra.get("sinks") is not None:
            raise NotImplementedError("attention sinks are not supported by tpu-plugin yet")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None
        self.kv_cache_dtype = kv_cache_dtype

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TorchaxAttentionStep,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by tpu-plugin")
        if not isinstance(attn_metadata, TorchaxAttentionStep):
            raise RuntimeError(
                "the torchax attention backend runs only inside the torchax model step "
                f"(got attention metadata {type(attn_metadata).__name__})"
            )
        name = layer.layer_name
        q: jax.Array = jax_view(query)
        k: jax.Array = jax_view(key)
        v: jax.Array = jax_view(value)
        out, attn_metadata.kv_caches[name] = paged_attention(
            q,
            k,
            v,
            attn_metadata.kv_caches[name],
            attn_metadata.metadata,
            sm_scale=self.scale,
            sliding_window=self.sliding_window,
            soft_cap=self.logits_soft_cap,
        )
        output.copy_(torch_view(out.astype(q.dtype)).reshape(output.shape))
        return output


class TorchaxPagedAttentionBackend(AttentionBackend):
    """The backend the platform names for every attention layer of a torchax model."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.bfloat16, torch.float16]
    forward_includes_kv_cache_update: bool = True  # the impl writes the pages itself

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[TorchaxPagedAttentionImpl]:
        return TorchaxPagedAttentionImpl

    @staticmethod
    def get_builder_cls():
        raise NotImplementedError(
            "tpu-plugin builds attention metadata in its own runner (tpu_plugin.runner.inputs)"
        )

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, *args: Any
    ) -> tuple[int, ...]:
        """Per layer a ``(k_pages, v_pages)`` pair, each of this shape (vLLM's LBNHC)."""
        return (num_blocks, block_size, num_kv_heads, head_size)


# vLLM looks the backend up by ``get_name()`` in its enum; point its out-of-tree slot here.
register_backend(AttentionBackendEnum.CUSTOM, BACKEND_QUALNAME)
