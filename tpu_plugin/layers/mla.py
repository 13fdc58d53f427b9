"""Multi-head latent attention (MLA, DeepSeek-V2/V3) over a compressed paged KV cache.

MLA's point is the cache: instead of ``heads x (k_dim + v_dim)`` values per token it stores one
latent vector ``c`` (``kv_lora_rank`` wide, after ``kv_a_layernorm``) and one rotary key shared
by all heads (``qk_rope_head_dim`` wide). A layer's pages are therefore a single array
``[num_pages, page_size, 1, kv_lora_rank + qk_rope_head_dim]``: one "KV head" of that width and
no separate V (vLLM's ``MLAAttentionSpec``). For DeepSeek-V3 that is 576 values per token and
layer instead of 128 x (192 + 128) = 40,960 for the expanded keys and values.

Attention runs from the cached latents in the weight-absorbed form. ``kv_b_proj`` maps a latent
to every head's non-rotary key (``W_UK[h]``) and value (``W_UV[h]``), so

    q_nope[h] . k_nope[h] = (W_UK[h]^T q_nope[h]) . c        (absorb W_UK into the query)
    sum_k p[h, k] v[h, k] = W_UV[h] (sum_k p[h, k] c_k)       (apply W_UV after the softmax)

and each head attends with the query ``[W_UK[h]^T q_nope[h], q_rope[h]]`` against the cached row
``[c, k_rope]``, and its output is the attention-weighted sum of latents, projected by
``W_UV[h]``. That is multi-query attention with one ``kv_lora_rank + qk_rope_head_dim`` wide key
whose first ``kv_lora_rank`` features are also the value; the pages are read once for both.
One path serves prefill chunks and decodes in the same ragged batch. (For long prefills the
expanded form, which up-projects the gathered latents with ``kv_b_proj``, does fewer flops;
the absorbed form is what decode wants, and it is the only one here.)

:func:`mla_paged_attention` is the pure-jnp implementation (the CPU path and the spec). A TPU
path would be a Pallas kernel with the same contract: per block of KV pages, DMA the latent
rows once into VMEM and use them for both the ``q . [c, k_rope]`` scores and the ``p . c``
accumulation (an online softmax, as the ragged paged attention kernel does per KV head), with
all query heads of a token stacked as the rows of one MXU tile.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from vllm.logger import init_logger

from tpu_kernels.ragged_paged_attention.reference import in_blocks, token_layout
from tpu_plugin import envs
from tpu_plugin.layers.attention import AttentionMetadata
from tpu_plugin.layers.linear import FusedLinear, Fusion, Linear
from tpu_plugin.layers.norm import RMSNorm
from tpu_plugin.layers.rope import RotaryEmbedding, rope_parameters

logger = init_logger(__name__)

# One layer's MLA pages: [num_pages, page_size, 1, page_row_width(kv_lora_rank + rope)].
LatentCache = jax.Array

# TPU vector lanes: a page row is stored padded to a multiple of this (page_row_width).
LANES = 128


def page_row_width(cache_width: int) -> int:
    """Values a latent page row stores: ``cache_width`` rounded up to whole 128-lane rows.

    The TPU compiler lays out a ``[pages, page_size, 1, 576]`` array (DeepSeek-V3's 512 + 64)
    in a padding-free order of its own, and every layer's scatter of the step's rows then
    copies the whole cache into row-major form and back (temporaries 1.11x the cache, 4.2x
    its bytes moved per update, measured with libtpu for v6e); 640-wide rows update in
    place. The padding (11% for DeepSeek-V3) is zeros, counted in the KV page size vLLM
    plans with, and never read: attention slices the rows back to ``cache_width``.
    """
    return -(-cache_width // LANES) * LANES


DEFAULT_TOKEN_BLOCK = 16
# transformers builds q_a_layernorm / kv_a_layernorm with DeepseekV3RMSNorm's default epsilon,
# not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(hf_config: Any) -> float:
    """``(qk_nope + qk_rope) ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` for scaled
    rope (DeepSeek's YaRN: the softmax is sharpened to match the longer context).

    The rope's own ``attention_factor`` (``mscale / mscale_all_dim``) is applied to cos/sin by
    :class:`RotaryEmbedding`; this is the part transformers applies to the softmax scale.
    """
    scale = (hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(hf_config)
    if params.get("rope_type", params.get("type", "default")) != "default":
        mscale_all_dim = params.get("mscale_all_dim", 0)
        factor = params["factor"]
        if mscale_all_dim and factor > 1:
            mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scale *= mscale * mscale
    return scale


@dataclass(frozen=True)
class MLASpec:
    """Static shape of one MLA block; frozen and hashable (static module data)."""

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None  # None: a plain q_proj (DeepSeek-V2-Lite); else q_a -> norm -> q_b
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RotaryEmbedding
    rope_interleave: bool
    sm_scale: float
    bias: bool = False  # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token and layer: the latent plus the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @classmethod
    def from_config(cls, hf_config: Any) -> MLASpec:
        rope_dim = hf_config.qk_rope_head_dim
        return cls(
            hidden_size=hf_config.hidden_size,
            num_heads=hf_config.num_attention_heads,
            q_lora_rank=getattr(hf_config, "q_lora_rank", None),
            kv_lora_rank=hf_config.kv_lora_rank,
            qk_nope_head_dim=hf_config.qk_nope_head_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=hf_config.v_head_dim,
            rope=RotaryEmbedding.from_config(hf_config, rope_dim),
            rope_interleave=bool(getattr(hf_config, "rope_interleave", False)),
            sm_scale=mla_softmax_scale(hf_config),
            bias=bool(getattr(hf_config, "attention_bias", False)),
        )


def write_latent_pages(pages: LatentCache, new: jax.Array, slot_mapping: jax.Array) -> LatentCache:
    """Scatters ``new`` (``[tokens, 1, cache_width]``) into the pages at ``slot_mapping``,
    zero-padded to the pages' row width (:func:`page_row_width`).

    Padding tokens (a negative slot or one past the cache) are dropped, as in
    :func:`tpu_kernels.ragged_paged_attention.reference.write_kv_pages`.
    """
    num_pages, page_size = pages.shape[:2]
    slot_mapping = jnp.where(slot_mapping < 0, num_pages * page_size, slot_mapping)
    page, offset = slot_mapping // page_size, slot_mapping % page_size
    new = jnp.pad(new, [(0, 0)] * (new.ndim - 1) + [(0, pages.shape[-1] - new.shape[-1])])
    return pages.at[page, offset].set(new.astype(pages.dtype), mode="drop")


def mla_paged_attention(
    queries: jax.Array,
    pages: LatentCache,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    value_dim: int,
    token_block: int = DEFAULT_TOKEN_BLOCK,
) -> jax.Array:
    """Absorbed-form MLA over the ragged batch: every packed token against its sequence's pages.

    ``queries`` is ``[tokens, heads, cache_width]`` (``[W_UK^T q_nope, q_rope]``); each cached row
    is the key, and its first ``value_dim`` (``kv_lora_rank``) features the value. Returns
    ``[tokens, heads, value_dim]`` float32 latent outputs; padding tokens' rows are zero.
    Causality, ragged layout and padding follow the ragged paged attention reference; tokens
    are processed in blocks so memory stays ``block x kv_width x cache_width``.
    """
    num_tokens, num_heads, width = queries.shape
    page_size = pages.shape[1]
    if pages.shape[2] != 1 or pages.shape[3] < width:
        raise ValueError(f"MLA pages {pages.shape} do not hold rows of the query width {width}")
    kv_width = page_indices.shape[1] * page_size
    seq_of_token, position, is_real = token_layout(kv_lens, query_start_loc, num_seqs, num_tokens)

    block = min(token_block, num_tokens)
    padded = -(-num_tokens // block) * block

    key_position = jnp.arange(kv_width, dtype=jnp.int32)

    def attend(args: tuple[jax.Array, ...]) -> jax.Array:
        q, seq, pos, real = args
        page_of_key = page_indices[seq][:, key_position // page_size]  # [block, kv_width]
        rows = pages[page_of_key, (key_position % page_size)[None, :], 0]  # [block, kv, row]
        rows = rows[..., :width]  # the row's lane padding (page_row_width) is never read
        visible = (key_position[None, :] <= pos[:, None]) & real[:, None]
        # Rows no query may see (other sequences, unwritten slots) can hold anything, even NaN.
        rows = jnp.where(visible[:, :, None], rows.astype(jnp.float32), 0.0)
        scores = jnp.einsum("bhd,bkd->bhk", q.astype(jnp.float32), rows) * jnp.float32(sm_scale)
        scores = jnp.where(visible[:, None, :], scores, -jnp.inf)
        row_max = jnp.max(scores, axis=-1, keepdims=True)
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # padding sees no key
        weights = jnp.exp(scores - row_max)
        denom = jnp.sum(weights, axis=-1, keepdims=True)
        out = jnp.einsum("bhk,bkl->bhl", weights, rows[..., :value_dim])
        return jnp.where(denom > 0, out / jnp.where(denom > 0, denom, 1.0), 0.0)

    out = jax.lax.map(
        attend,
        (
            in_blocks(queries, block),
            in_blocks(seq_of_token, block),
            in_blocks(position, block),
            in_blocks(is_real, block, False),
        ),
    )
    return out.reshape(padded, num_heads, value_dim)[:num_tokens]


@functools.cache
def _warn_if_kernel_requested() -> None:
    """``TPU_PLUGIN_ATTENTION=pallas*`` cannot apply to MLA yet: say so instead of ignoring it."""
    if envs.attention_impl() in ("pallas", "pallas-interpret"):
        logger.warning(
            "TPU_PLUGIN_ATTENTION=%s: MLA has no Pallas kernel yet; its layers run the pure-jnp "
            "paged MLA attention",
            envs.attention_impl(),
        )


def deinterleave(x: jax.Array) -> jax.Array:
    """``(x0, x1), (x2, x3), …`` pairs → ``[x0, x2, …, x1, x3, …]``.

    DeepSeek's checkpoints rotate adjacent pairs (``rope_interleave``); after this permutation
    the usual rotate-half rope gives exactly transformers' interleaved result, in its layout.
    """
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


class MLAAttention(nnx.Module):
    """DeepSeek's attention block; parameter names follow Hugging Face's ``self_attn``.

    With a query LoRA (DeepSeek-V3) the two projections of the block's input, ``q_a_proj`` and
    ``kv_a_proj_with_mqa``, run as one matmul, ``fused_qkv_a_proj`` (the loader concatenates
    the two checkpoint tensors; both are replicated under tensor parallelism). Without one
    (DeepSeek-V2-Lite) ``q_proj`` is split over the devices and ``kv_a_proj_with_mqa`` is not,
    so they stay apart.
    """

    def __init__(self, spec: MLASpec, dtype: jnp.dtype):
        _warn_if_kernel_requested()
        self.spec = spec
        h, q_out = spec.hidden_size, spec.num_heads * spec.qk_head_dim
        if spec.q_lora_rank is None:
            self.q_proj = Linear(h, q_out, dtype)
            self.fused_qkv_a_proj = self.q_a_layernorm = self.q_b_proj = None
            self.kv_a_proj_with_mqa = Linear(h, spec.cache_width, dtype, bias=spec.bias)
        else:
            self.q_proj = self.kv_a_proj_with_mqa = None
            fusion = Fusion(
                (("q_a_proj", spec.q_lora_rank), ("kv_a_proj_with_mqa", spec.cache_width)),
                groups=1,
            )
            self.fused_qkv_a_proj = FusedLinear(h, fusion, dtype, bias=spec.bias)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = Linear(spec.q_lora_rank, q_out, dtype)
        self.kv_a_layernorm = RMSNorm(spec.kv_lora_rank, LATENT_NORM_EPS, dtype)
        self.kv_b_proj = Linear(
            spec.kv_lora_rank, spec.num_heads * (spec.qk_nope_head_dim + spec.v_head_dim), dtype
        )
        self.o_proj = Linear(spec.num_heads * spec.v_head_dim, h, dtype, bias=spec.bias)

    def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return self.spec.rope(deinterleave(x) if self.spec.rope_interleave else x, positions)

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: LatentCache, md: AttentionMetadata
    ) -> tuple[jax.Array, LatentCache]:
        spec, tokens = self.spec, x.shape[0]
        if self.q_proj is not None:
            q, compressed = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        else:
            q_a, compressed = self.fused_qkv_a_proj.parts(x)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        q = q.reshape(tokens, spec.num_heads, spec.qk_head_dim)
        q_nope, q_rope = q[..., : spec.qk_nope_head_dim], q[..., spec.qk_nope_head_dim :]
        # compressed: [T, kv_lora_rank + rope]
        latent = self.kv_a_layernorm(compressed[:, : spec.kv_lora_rank])
        k_rope = self._rope(compressed[:, None, spec.kv_lora_rank :], positions)  # [T, 1, R]
        q_rope = self._rope(q_rope, positions)
        new_rows = jnp.concatenate([latent[:, None, :], k_rope.astype(latent.dtype)], axis=-1)
        cache = write_latent_pages(cache, new_rows, md.slot_mapping)

        # kv_b_proj rows are per head: qk_nope_head_dim key rows, then v_head_dim value rows.
        w_kv = self.kv_b_proj.weight[...].reshape(
            spec.num_heads, spec.qk_nope_head_dim + spec.v_head_dim, spec.kv_lora_rank
        )
        w_uk, w_uv = w_kv[:, : spec.qk_nope_head_dim], w_kv[:, spec.qk_nope_head_dim :]
        # Absorbed products in float32 (operands upcast: XLA CPU has no batched bf16 x bf16 ->
        # f32 dot; a TPU kernel would feed bf16 to the MXU with f32 accumulation instead).
        f32 = jnp.float32
        q_latent = jnp.einsum("thn,hnl->thl", q_nope.astype(f32), w_uk.astype(f32))
        queries = jnp.concatenate([q_latent, q_rope.astype(f32)], axis=-1)  # [T, H, L + R]
        out_latent = mla_paged_attention(
            queries,
            cache,
            md.kv_lens,
            md.page_indices,
            md.query_start_loc,
            md.num_seqs,
            sm_scale=spec.sm_scale,
            value_dim=spec.kv_lora_rank,
        )
        out = jnp.einsum("thl,hvl->thv", out_latent, w_uv.astype(f32)).astype(x.dtype)
        return self.o_proj(out.reshape(tokens, spec.num_heads * spec.v_head_dim)), cache
