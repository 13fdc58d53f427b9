"""Every sharding rule of the plugin, in one place: parameter name → ``PartitionSpec``.

Models stay device-count free: their parameters keep Hugging Face names, and this module maps
those names to specs on the ``("data", "model")`` mesh of :mod:`tpu_plugin.parallel.mesh`
(Megatron-style tensor parallelism; XLA's SPMD partitioner inserts the collectives):

- fused q/k/v, ``qkv_proj`` ``[kv_heads, (group + 2) * head_dim, hidden]`` (grouped by KV head,
  :class:`tpu_plugin.layers.linear.Fusion`): split on axis 0, so each device holds whole KV
  groups, i.e. its query heads and exactly their K and V heads, and computes them with no
  communication; its bias ``[kv_heads, ...]`` likewise;
- when the KV heads do not divide over the devices (fewer KV heads than devices) the KV pages
  are replicated and every device attends with all heads; ``qkv_proj`` is then split on its
  input axis instead (partial sums: one all-reduce gives every device all of q, k and v, which
  the replicated attention needs, while each device holds ``1 / tp`` of the weight; splitting
  q alone would need the k/v rows copied onto every device); its bias replicated;
- fused gate/up, ``gate_up_proj`` ``[intermediate, 2, hidden]`` (row ``i`` of gate next to row
  ``i`` of up): split on axis 0, so each device holds the same rows of gate and of up (a
  contiguous split of a concatenated ``[gate; up]`` would give one device only gate rows);
- column-split (output rows over ``model``): ``q_proj`` (MLA without a query LoRA) — each device
  computes its own heads;
- row-split (input columns over ``model``): ``o_proj``, ``down_proj`` — partial sums, one
  all-reduce per block; their biases replicated;
- ``embed_tokens`` / ``lm_head`` ``[vocab, hidden]`` split on the vocabulary when it divides;
  the logits are computed vocabulary-split and then gathered (:meth:`ShardingPlan.logits`),
  else XLA gathers the whole ``lm_head`` weight every step;
- stacked experts (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``): with
  ``--enable-expert-parallel`` the ``expert`` axis the MoE layer annotates on dimension 0 maps to
  ``model`` (whole experts per device); without it, tensor parallelism inside every expert
  (``2I`` / ``I`` split like ``gate_proj``/``down_proj``);
- LoRA adapter slots (``<projection>.lora.a`` ``[slots, rank, in]`` and ``.lora.b``
  ``[*out, slots, rank]``, :mod:`tpu_plugin.layers.lora`) follow their projection's weight
  ``[*out, in]``: ``a`` is split where the weight splits its input (row-split projections:
  the partial ``x A^T`` is all-reduced, ``[tokens, slots * rank]``, tiny), ``b`` where it splits
  its outputs (column-split and fused ones: each device adds its own rows' update), so every
  device updates exactly the outputs it computes;
- everything else (norms, routers, rotary tables) replicated.

A dimension that a rule would split but that does not divide over the devices is replicated
instead (the run stays correct; :meth:`ShardingPlan.describe` shows the decision).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tpu_plugin.parallel.mesh import MODEL_AXIS, ParallelLayout

COLUMN_SPLIT = ("q_proj",)
ROW_SPLIT = ("o_proj", "down_proj")
FUSED_QKV = "qkv_proj"  # [kv_heads, rows per group, hidden]: whole KV groups per device
FUSED_GATE_UP = "gate_up_proj"  # [intermediate, 2, hidden]: matching gate/up rows per device
EXPERT_STACKS = {"gate_up_proj": 1, "down_proj": 2}  # stacked tensor → its TP dimension
# Parameters of quantized linear layers beside ``weight`` and ``bias``.
QUANTIZATION_LEAVES = ("weight_scale", "weight_zero_point", "input_scale")
EXPERT_AXIS = "expert"  # the logical axis name the MoE layer annotates (layers/moe.py)


def _split_dim(shape: tuple[int, ...], dim: int, tp: int) -> P:
    """``model`` on ``dim`` when it divides over ``tp`` devices, else replicated."""
    if tp == 1 or shape[dim] % tp:
        return P()
    spec: list[str | None] = [None] * len(shape)
    spec[dim] = MODEL_AXIS
    return P(*spec)


def param_spec(
    name: str, shape: tuple[int, ...], layout: ParallelLayout, annotation: tuple | None = None
) -> P:
    """The ``PartitionSpec`` of parameter ``name`` (Hugging Face name) of shape ``shape``.

    ``annotation`` is the parameter's flax ``out_sharding`` (logical axis names), if any.
    """
    tp = layout.tp
    parts = name.split(".")
    leaf = parts[-1]
    module = parts[-2] if len(parts) > 1 else ""
    if tp == 1:
        return P()
    if leaf in EXPERT_STACKS and module == "experts":
        if layout.expert_parallel:
            logical = annotation or (EXPERT_AXIS,) + (None,) * (len(shape) - 1)
            dims = [i for i, axis in enumerate(logical) if axis == EXPERT_AXIS]
            return _split_dim(shape, dims[0], tp) if dims else P()
        return _split_dim(shape, EXPERT_STACKS[leaf], tp)
    if leaf in QUANTIZATION_LEAVES:  # quantized layers' scales follow their weight's rows
        return _scale_spec(module, leaf, shape, layout)
    if leaf not in ("weight", "bias"):
        return P()
    if module == FUSED_QKV and len(shape) >= 2:
        if shape[0] % tp == 0:  # the KV groups divide: whole groups per device
            return _split_dim(shape, 0, tp)
        # KV heads replicated: partial sums over the input axis (module doc); bias replicated
        return _split_dim(shape, len(shape) - 1, tp) if leaf == "weight" else P()
    if module == FUSED_GATE_UP and len(shape) >= 2:
        return _split_dim(shape, 0, tp)
    if module in COLUMN_SPLIT:
        return _split_dim(shape, 0, tp)
    if module in ROW_SPLIT:
        return _split_dim(shape, 1, tp) if leaf == "weight" else P()
    if module in ("embed_tokens", "lm_head") and leaf == "weight":
        return _split_dim(shape, 0, tp)
    return P()


def _scale_spec(module: str, leaf: str, shape: tuple[int, ...], layout: ParallelLayout) -> P:
    """Quantization scales and zero points (``tpu_plugin.layers.linear.QuantizedLinear``):
    split on the output rows with a column-split weight; a row-split weight's per-row scales
    are whole on every device, its 4-bit group scales ``[N, K / group]`` split on the groups."""
    if leaf == "input_scale":
        return P()
    if module in (FUSED_QKV, FUSED_GATE_UP) and len(shape) >= 2:
        # fused scales ``[groups, rows / groups(, K / group)]`` follow their weight (above)
        if shape[0] % layout.tp == 0:
            return _split_dim(shape, 0, layout.tp)
        if module == FUSED_QKV and len(shape) == 3:  # weight split on K: its group scales too
            return _split_dim(shape, 2, layout.tp)
        return P()
    if module in COLUMN_SPLIT:
        return _split_dim(shape, 0, layout.tp)
    if module in ROW_SPLIT and len(shape) == 2:
        return _split_dim(shape, 1, layout.tp)
    return P()


LORA_LEAVES = ("lora.a", "lora.b")


def lora_spec(weight_spec: P, weight_ndim: int, leaf: str) -> P:
    """The spec of a projection's adapter slots (``leaf`` "a" or "b") from its weight's."""
    axes = tuple(weight_spec) + (None,) * (weight_ndim - len(tuple(weight_spec)))
    if leaf == "a":
        return P(None, None, axes[-1])
    return P(*axes[:-1], None, None)


def kv_spec(shape: tuple[int, ...], layout: ParallelLayout) -> P:
    """KV pages ``[blocks, page, kv_heads, dim]``: split on the KV heads when they divide.

    Any other layout (e.g. a latent MLA cache without a head axis) is replicated.
    """
    if len(shape) == 4 and shape[2] == layout.num_kv_heads and layout.kv_heads_split:
        return _split_dim(shape, 2, layout.tp)
    return P()


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """The mesh plus the layout; places parameters, KV pages and step inputs on the mesh."""

    mesh: Mesh
    layout: ParallelLayout

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def multi_process(self) -> bool:
        """The mesh spans devices of other processes (Ray, one worker per host)."""
        return jax.process_count() > 1

    def describe(self, params: nnx.State) -> dict[str, P]:
        """``{parameter name: spec}`` for every parameter, as :meth:`shard_params` places it."""
        out, ndims, adapters = {}, {}, []
        for path, var in nnx.to_flat_state(params):
            name = ".".join(str(p) for p in path)
            value = var.get_value()
            if name.endswith(LORA_LEAVES):  # after the weights: they follow them
                adapters.append(name)
                continue
            annotation = var.get_metadata().get("out_sharding")
            out[name] = param_spec(name, tuple(value.shape), self.layout, annotation)
            ndims[name] = len(value.shape)
        for name in adapters:
            weight, _, leaf = name.rpartition(".lora.")
            out[name] = lora_spec(out[weight + ".weight"], ndims[weight + ".weight"], leaf)
        return out

    def shard_params(self, params: nnx.State) -> nnx.State:
        """Moves every parameter onto the mesh with its spec (in place; returns ``params``)."""
        specs = self.describe(params)
        for path, var in nnx.to_flat_state(params):
            name = ".".join(str(p) for p in path)
            var.set_value(jax.device_put(var.get_value(), self.named(specs[name])))
        return params

    def abstract_params(self, params: nnx.State) -> nnx.State:
        """``params`` as ``jax.ShapeDtypeStruct`` leaves carrying the shardings
        :meth:`shard_params` would give them: the parameters of an ahead-of-time compile
        (the TPU planner) without any memory behind them."""
        specs = self.describe(params)
        flat = []
        for path, var in nnx.to_flat_state(params):
            value = var.get_value()
            name = ".".join(str(p) for p in path)
            abstract = jax.ShapeDtypeStruct(
                value.shape, value.dtype, sharding=self.named(specs[name])
            )
            flat.append((path, var.replace(abstract)))
        return nnx.from_flat_state(flat)

    def kv_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        return self.named(kv_spec(shape, self.layout))

    def kv_shards(self, shape: tuple[int, ...]) -> int:
        """Into how many parts pages of ``shape`` are split across the devices (1: every
        device holds all of them)."""
        sharding = self.kv_sharding(shape)
        return max(1, math.prod(shape) // math.prod(sharding.shard_shape(shape)))

    def constrain_kv(self, kv_caches: Any) -> Any:
        """Inside the jitted step: keeps the updated pages in their allocated sharding, so the
        donated input buffers are reused and nothing is resharded between steps."""
        return jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(x, self.kv_sharding(tuple(x.shape))),
            kv_caches,
        )

    def logits(self, x: jax.Array) -> jax.Array:
        """Inside the jitted step: ``[rows, vocab]`` logits computed vocabulary-split (each
        device its slice of ``lm_head``), then replicated: the gather moves the logits, not the
        ``lm_head`` weight, which XLA otherwise all-gathers when only the replicated output is
        constrained."""
        if self.layout.tp > 1 and x.shape[-1] % self.layout.tp == 0:
            spec = P(*([None] * (x.ndim - 1)), MODEL_AXIS)
            x = jax.lax.with_sharding_constraint(x, self.named(spec))
        return jax.lax.with_sharding_constraint(x, self.replicated)

    def put_inputs(self, tree: Any) -> Any:
        """Step inputs onto the mesh. One process: as they are (jit places them); several:
        as global replicated arrays (every process holds the same host values)."""
        if not self.multi_process:
            return tree
        return jax.device_put(tree, self.replicated)

    def local_result(self, x: jax.Array) -> jax.Array:
        """A replicated result as this process's local array (for host-side sampling)."""
        if not self.multi_process:
            return x
        return x.addressable_data(0)
