"""Dense layers whose parameters keep Hugging Face's names and layouts, and fused projections.

``weight`` is stored as ``[out_features, in_features]`` exactly as in the checkpoint, so the
loader maps tensors to parameters by name alone; XLA contracts over the last axis directly,
with no transposed copy. This module is the one place that chooses how a projection is
multiplied (quantized matmuls land here too).

Projections that read the same input run as one matmul (:class:`FusedLinear`): q/k/v
(``self_attn.qkv_proj``), gate/up (``mlp.gate_up_proj``) and MLA's two down-projections
(``self_attn.fused_qkv_a_proj``). One wider matmul reads the same weight bytes as the parts but
is one kernel instead of two or three, and its input is read once. The fused weight is laid out
so that tensor parallelism can split it contiguously on one axis and every device still holds
matching parts (:class:`Fusion`); the loader builds it from the checkpoint's separate tensors,
or cuts a checkpoint's own fused tensor (Phi-3's ``[q; k; v]`` and ``[gate; up]``) first.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Linear(nnx.Module):
    """``y = x @ weight.T (+ bias)``; ``out_features`` may be a shape (``weight`` is then
    ``[*out_features, in_features]`` and ``y`` ends in ``out_features``). Plus the token's LoRA
    adapter where the runner attached adapter slots (``lora``, a
    ``tpu_plugin.layers.lora.LoRASlots``; ``None`` otherwise), its output in the weight's own
    output layout (a fused projection's too).

    A shaped weight is multiplied as the 2-D matrix ``[prod(out_features), in_features]`` (a
    reshape of its row-major layout, no data moves): a dot with several output dimensions is
    canonicalised by XLA into a transpose of the weight, which XLA's CPU backend materialised
    as a copy of the whole weight every step (``tools/hlo_inventory.py`` on a CPU compile
    showed one per fused weight; the 2-D form is the canonical one on every backend). Tensor
    parallelism splits a fused weight on axis 0 only, which the reshape keeps contiguous per
    device.
    """

    lora: nnx.Module | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int | tuple[int, ...],
        dtype: jnp.dtype,
        bias: bool = False,
    ):
        out = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        self.weight = nnx.Param(jnp.zeros((*out, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros(out, dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        out = w.shape[:-1]
        w = w.reshape(-1, w.shape[-1])
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))
        y = y.reshape(*x.shape[:-1], *out)
        if self.bias is not None:
            y = y + self.bias[...]
        if self.lora is not None and (update := self.lora(x)) is not None:
            y = y + update
        return y


@dataclasses.dataclass(frozen=True)
class Fusion:
    """How one fused weight holds several Hugging Face projections of the same input.

    ``parts``: ``(module name, output rows)`` of each projection, in order, as named in the
    checkpoint next to the fused module (``("q_proj", 4096), ("k_proj", 1024), …``).

    The weight is ``[groups, sum(rows) / groups, in]``: group ``j`` holds the ``j``-th
    ``1 / groups`` of every part's rows, in part order, so a contiguous split over axis 0 gives
    each device whole groups:

    - q/k/v, ``groups`` = KV heads: group ``j`` is the query heads that share KV head ``j``,
      then that K head, then that V head; each device gets whole heads, its queries with their
      own keys and values (grouped-query attention maps query head ``h`` to KV head
      ``h // (heads / kv_heads)``, as HF does);
    - gate/up, ``groups`` = intermediate rows: row ``i`` of gate, then row ``i`` of up
      (``[I, 2, in]``); each device gets the same rows of both;
    - MLA's two input projections, ``groups`` = 1 (never split: they are replicated).

    The layout has the same shape whatever the device count, so the model stays device free and
    one checkpoint serves every tensor-parallel size; axis 0 is the only one split, which keeps
    :class:`Linear`'s 2-D view of the weight contiguous per device.
    """

    parts: tuple[tuple[str, int], ...]
    groups: int

    def __post_init__(self) -> None:
        if self.groups < 1 or any(r % self.groups for _, r in self.parts):
            raise ValueError(f"{self.parts}: every part's rows must divide into {self.groups}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts)

    @property
    def rows(self) -> int:
        """Output rows of all parts together (the checkpoint's fused tensor, Phi-3 style)."""
        return sum(r for _, r in self.parts)

    def out_shape(self) -> tuple[int, int]:
        return self.groups, self.rows // self.groups

    def pack(self, tensors: list[np.ndarray]) -> np.ndarray:
        """The fused parameter from the parts' checkpoint tensors (``[rows_i, ...]`` each)."""
        xp = jnp if any(isinstance(t, jax.Array) for t in tensors) else np
        grouped = [t.reshape(self.groups, -1, *t.shape[1:]) for t in tensors]
        return xp.concatenate(grouped, axis=1)

    def unpack(self, fused: np.ndarray) -> list[np.ndarray]:
        """The parts, in the checkpoint's per-part layout (the inverse of :meth:`pack`)."""
        return list(self.split(jnp.asarray(fused), axis=0))

    def cut_concatenated(self, tensor: np.ndarray) -> list[np.ndarray]:
        """A checkpoint's fused tensor, parts concatenated on axis 0 (Phi-3), cut into them."""
        xp = jnp if isinstance(tensor, jax.Array) else np
        return list(xp.split(tensor, np.cumsum([r for _, r in self.parts])[:-1], axis=0))

    def split(self, y: jax.Array, axis: int = -1) -> tuple[jax.Array, ...]:
        """The parts of a fused result whose fused axes (``out_shape``) start at ``axis``,
        each flattened to its checkpoint layout (``[..., rows_i, ...]``)."""
        axis = axis % y.ndim
        lead, tail = y.shape[:axis], y.shape[axis + 2 :]
        out, start = [], 0
        for _, rows in self.parts:
            width = rows // self.groups
            part = jax.lax.slice_in_dim(y, start, start + width, axis=axis + 1)
            out.append(part.reshape(*lead, rows, *tail))
            start += width
        return tuple(out)


class FusedLinear(Linear):
    """One matmul for the projections of :class:`Fusion`; :meth:`parts` gives them apart.

    ``weight`` is ``[*fusion.out_shape(), in_features]``; the parameter name is the fused
    module's (``qkv_proj``, ``gate_up_proj``), the checkpoint tensors it is built from are the
    parts' names (see :mod:`tpu_plugin.models.loader`).
    """

    def __init__(self, in_features: int, fusion: Fusion, dtype: jnp.dtype, bias: bool = False):
        super().__init__(in_features, fusion.out_shape(), dtype, bias=bias)
        self.fusion = fusion

    def parts(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Every part's output, ``[..., rows_i]`` (as the separate projections would give)."""
        return self.fusion.split(self(x), axis=x.ndim - 1)


def grouped_qkv(num_heads: int, num_kv_heads: int, head_dim: int) -> Fusion:
    """q/k/v of grouped-query attention, grouped by KV head (see :class:`Fusion`)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    return Fusion(
        (
            ("q_proj", num_heads * head_dim),
            ("k_proj", num_kv_heads * head_dim),
            ("v_proj", num_kv_heads * head_dim),
        ),
        groups=num_kv_heads,
    )


class Embedding(nnx.Module):
    """Token embedding; :meth:`attend` reuses it as the output head (tied embeddings)."""

    def __init__(self, vocab_size: int, dim: int, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.zeros((vocab_size, dim), dtype))

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], token_ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jax.lax.dot_general(
            x,
            self.weight[...],
            (((x.ndim - 1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
