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
    ``[*out_features, in_features]`` and ``y`` ends in ``out_features``)."""

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
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (w.ndim - 1,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...]
        return y


@dataclasses.dataclass(frozen=True)
class Fusion:
    """How one fused weight holds several Hugging Face projections of the same input.

    ``parts``: ``(module name, output rows)`` of each projection, in order, as named in the
    checkpoint next to the fused module (``("q_proj", 4096), ("k_proj", 1024), …``).

    - ``groups`` > 0 (q/k/v): weight ``[groups, sum(rows) / groups, in]``; group ``j`` holds
      the ``j``-th ``1 / groups`` of every part's rows, in part order. With ``groups`` = KV
      heads, group ``j`` is the query heads that share KV head ``j``, then that K head, then
      that V head; a contiguous split over axis 0 gives each device whole heads, its queries
      with their own keys and values (grouped-query attention maps query head ``h`` to KV head
      ``h // (heads / kv_heads)``, as HF does).
    - ``groups`` = 0 (gate/up): the parts, of equal rows, stacked: ``[len(parts), rows, in]``;
      a split over axis 1 gives each device the same rows of gate and of up.

    Both layouts have the same shape whatever the device count, so the model stays device
    free and one checkpoint serves every tensor-parallel size.
    """

    parts: tuple[tuple[str, int], ...]
    groups: int = 0

    def __post_init__(self) -> None:
        rows = [r for _, r in self.parts]
        if self.groups and any(r % self.groups for r in rows):
            raise ValueError(f"{self.parts}: every part's rows must divide into {self.groups}")
        if not self.groups and len(set(rows)) != 1:
            raise ValueError(f"{self.parts}: stacked parts need equal rows")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts)

    @property
    def rows(self) -> int:
        """Output rows of all parts together (the checkpoint's fused tensor, Phi-3 style)."""
        return sum(r for _, r in self.parts)

    def out_shape(self) -> tuple[int, int]:
        if self.groups:
            return self.groups, self.rows // self.groups
        return len(self.parts), self.parts[0][1]

    def pack(self, tensors: list[np.ndarray]) -> np.ndarray:
        """The fused parameter from the parts' checkpoint tensors (``[rows_i, ...]`` each)."""
        xp = jnp if any(isinstance(t, jax.Array) for t in tensors) else np
        if self.groups:
            grouped = [t.reshape(self.groups, -1, *t.shape[1:]) for t in tensors]
            return xp.concatenate(grouped, axis=1)
        return xp.stack(tensors)

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
        if not self.groups:
            return tuple(
                jax.lax.index_in_dim(y, i, axis, keepdims=False) for i in range(len(self.parts))
            )
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
