"""Multi-LoRA inside the jitted forward: many adapters, one batch, fixed shapes.

Every adapted projection (a :class:`~tpu_plugin.layers.linear.Linear` named ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj`` or ``down_proj``, or a fused
projection whose parts carry those names) gets a :class:`LoRASlots` module: the A and B
matrices of ``max_loras`` adapters stacked in fixed slots, every adapter padded to
``max_lora_rank`` with zeros. The runner fills and evicts slots by writing rows of these arrays
(shapes never change, so nothing recompiles); each step says which slot every token uses
(:func:`token_adapters`, ``-1`` for the base model), and the update
``x A_s^T B_s^T * scaling`` is computed for the whole batch at once:

* ``x @ A^T`` for all slots in one matmul (``[tokens, slots * rank]``: A is small),
* the columns of slots other than the token's own zeroed (a mask, so base-model tokens and
  padding get exactly zero),
* one matmul with B laid out ``[*out, slots, rank]``, added to the base projection's output.

Work is ``slots x`` that of one adapter per token, the price of two plain matmuls instead of a
gather of per-token weights (``tokens x`` the weight bytes) or sorted segments (``lax
.ragged_dot`` expands into the same masked dense product on XLA's CPU and GPU backends;
measured in ``benchmarks/NOTES_lora.md``).

Fused projections (a :class:`~tpu_plugin.layers.linear.FusedLinear`: ``self_attn.qkv_proj``
``[kv_heads, (group + 2) * head_dim, in]`` grouped by KV head, ``mlp.gate_up_proj``
``[I, 2, in]`` with row ``i`` of gate next to row ``i`` of up) get one update for all their
parts, adapters still naming the parts (PEFT's ``q_proj``, ``k_proj``, ``v_proj``,
``gate_proj``, ``up_proj``): A stacks the parts' A matrices (``parts * rank`` rows), B is block
diagonal (part ``p``'s output rows read only its own ``rank`` columns) and is packed into the
fused weight's own output layout with ``fusion.pack`` (``[*fusion.out_shape(), cols]``), so
the update is added to the fused output before it is split, every part's rows in the place of
that part's weight rows, and B shards exactly like the weight (axis 0: whole KV groups, the
same gate/up rows per device). A fused projection whose parts are not all targets (MLA's
``fused_qkv_a_proj``) is not adapted.
Scaling (``lora_alpha / r``, rsLoRA's ``/ sqrt(r)``) is folded into B when a slot is written.

The model never learns about vLLM: it sees arrays in its parameter tree and an index per token.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpu_plugin.layers.linear import Linear

# The projections an adapter may target (PEFT module names, as in the checkpoint).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Each token's slot while the forward is traced ([tokens] int32; -1: no adapter), or None.
_TOKEN_SLOTS: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "tpu_plugin_lora_token_slots", default=None
)


class LoRAWeight(nnx.Variable):
    """Adapter slots: not a checkpoint tensor (the loader never sees it), written by the runner."""


class LoRASlots(nnx.Module):
    """The adapter slots of one projection (see the module docstring for the layout).

    ``a``: ``[slots, parts * rank, in]``; ``b``: ``[*out, slots, parts * rank]`` where ``out``
    is the projection's output shape (its weight's leading axes).
    """

    def __init__(
        self,
        in_features: int,
        out_shape: tuple[int, ...],
        num_parts: int,
        max_loras: int,
        max_rank: int,
        dtype: jnp.dtype,
    ):
        cols = num_parts * max_rank
        self.a = LoRAWeight(jnp.zeros((max_loras, cols, in_features), dtype))
        self.b = LoRAWeight(jnp.zeros((*out_shape, max_loras, cols), dtype))

    def __call__(self, x: jax.Array) -> jax.Array | None:
        """The update to add to the projection of ``x`` (``[..., in]``), or None outside a step
        with adapters (the base model's programs carry no LoRA work at all)."""
        slots = _TOKEN_SLOTS.get()
        if slots is None:
            return None
        a, b = self.a[...], self.b[...]
        num_slots, cols = a.shape[0], a.shape[1]
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        contract_last = (((1,), (1,)), ((), ()))
        xa = jax.lax.dot_general(rows, a.reshape(num_slots * cols, -1), contract_last)
        own = slots[:, None] == jnp.arange(num_slots, dtype=slots.dtype)[None, :]
        xa = jnp.where(own[:, :, None], xa.reshape(-1, num_slots, cols), 0).astype(x.dtype)
        out = jax.lax.dot_general(
            xa.reshape(-1, num_slots * cols), b.reshape(-1, num_slots * cols), contract_last
        )
        return out.reshape(*lead, *b.shape[:-2])


@contextlib.contextmanager
def token_adapters(slots: jax.Array | None) -> Iterator[None]:
    """Inside the jitted forward: every :class:`LoRASlots` applies slot ``slots[t]`` to token
    ``t`` (``-1``: none). ``None`` (a step without adapters) leaves the model as it is."""
    if slots is None:
        yield
        return
    token = _TOKEN_SLOTS.set(slots)
    try:
        yield
    finally:
        _TOKEN_SLOTS.reset(token)


@dataclasses.dataclass(frozen=True)
class LoRATarget:
    """One adapted projection: where it is and which checkpoint modules it holds.

    ``prefix`` is the module path up to the projection's parent (``model.layers.3.self_attn``);
    ``parts`` the checkpoint modules (``(name, output rows)``) it computes, one for a plain
    projection, several for a fused one (then ``fusion`` says how they are laid out).
    """

    path: tuple[Any, ...]
    prefix: str
    parts: tuple[tuple[str, int], ...]
    in_features: int
    out_shape: tuple[int, ...]
    fusion: Any = None  # tpu_plugin.layers.linear.Fusion for fused projections

    def module_names(self) -> list[str]:
        """The adapter module names (PEFT's, without ``base_model.model.``) it serves."""
        return [f"{self.prefix}.{name}" for name, _ in self.parts]

    def pack(
        self, weights: dict[str, tuple[np.ndarray, np.ndarray, float]], max_rank: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """One slot's rows of ``a`` and ``b`` from ``{part name: (lora_a [r, in], lora_b
        [rows, r], scaling)}`` (missing parts: zeros): A stacked per part, B block diagonal
        with the scaling folded in, both padded to ``max_rank`` per part."""
        cols = len(self.parts) * max_rank
        a = np.zeros((cols, self.in_features), np.float32)
        blocks = []
        for p, (name, rows) in enumerate(self.parts):
            block = np.zeros((rows, cols), np.float32)
            if name in weights:
                lora_a, lora_b, scaling = weights[name]
                rank = lora_a.shape[0]
                a[p * max_rank : p * max_rank + rank] = lora_a
                block[:, p * max_rank : p * max_rank + rank] = lora_b * scaling
            blocks.append(block)
        b = self.fusion.pack(blocks) if self.fusion is not None else blocks[0]
        return a, np.asarray(b).reshape(*self.out_shape, cols)


def _parts_of(name: str, module: Linear) -> tuple[tuple[str, int], ...] | None:
    """The checkpoint modules a projection computes, if it is a LoRA target."""
    fusion = getattr(module, "fusion", None)
    if fusion is not None:
        parts = tuple(fusion.parts)
        return parts if all(part in TARGET_MODULES for part, _ in parts) else None
    if name in TARGET_MODULES:
        return ((name, int(np.prod(module.weight.get_value().shape[:-1]))),)
    return None


def attach_slots(
    model: nnx.Module,
    max_loras: int,
    max_rank: int,
    dtype: jnp.dtype,
    modules: tuple[str, ...] = TARGET_MODULES,
) -> list[LoRATarget]:
    """Gives every target projection of ``model`` zeroed adapter slots; returns the targets.

    ``modules`` restricts the targets (vLLM's ``--lora-target-modules``); a fused projection is
    adapted when any of its parts is named. Works on concrete and on abstract
    (``nnx.eval_shape``) models alike.
    """
    targets = []
    for path, module in list(nnx.iter_graph(model)):
        if not isinstance(module, Linear) or not path:
            continue
        parts = _parts_of(str(path[-1]), module)
        if parts is None or not any(part in modules for part, _ in parts):
            continue
        shape = tuple(module.weight.get_value().shape)
        target = LoRATarget(
            path=tuple(path),
            prefix=".".join(str(p) for p in path[:-1]),
            parts=parts,
            in_features=shape[-1],
            out_shape=shape[:-1],
            fusion=getattr(module, "fusion", None),
        )
        module.lora = LoRASlots(shape[-1], shape[:-1], len(parts), max_loras, max_rank, dtype=dtype)
        targets.append(target)
    return targets
