"""The sparse mixture-of-experts block: router → top-k selection → fused routed experts.

One module serves every MoE family here. The pieces keep Hugging Face's names, so checkpoints
load by name (the loader stacks per-expert tensors, see :func:`expert_stacking_rules`):

- ``gate``: the router, :class:`TopKRouter` (``weight [E, H]``, optionally DeepSeek-V3's
  ``e_score_correction_bias [E]``);
- ``experts``: :class:`FusedExperts`, all routed experts stacked on axis 0, in the layout of
  transformers 5's fused experts: ``gate_up_proj [E, 2I, H]`` (rows: gate, then up; HF
  ``[out, in]``) and ``down_proj [E, H, I]``;
- optionally shared experts that every token passes through (DeepSeek-V3's ``shared_experts``,
  Qwen2-MoE's ``shared_expert``, a plain :class:`~tpu_plugin.layers.mlp.GatedMLP`), optionally
  scaled by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE).

The routed experts run in one fused call from ``tpu_kernels.fused_moe``: the Mosaic Pallas kernel
on TPU, ``xla.fused_moe`` elsewhere (rows grouped by expert, so work follows the real routing);
``TPU_PLUGIN_MOE`` overrides the choice (:func:`moe_kernel`).

Expert parallelism: the stacked expert weights carry a flax sharding annotation
(``nnx.Param(..., out_sharding=...)``, recorded only: ``eager_sharding=False``, so building the
model needs no mesh) that names the mesh axis :data:`EXPERT_AXIS` (``"expert"``) on their
expert dimension and nothing (replicated) on the others: ``("expert", None, None)``. The router
and shared experts carry no annotation (replicated). A parallelism layer reads the annotations
with ``nnx.get_partition_spec(nnx.state(model))`` and places the parameters on a mesh with an
``expert`` axis, without touching model code. Sharding the experts also needs each device to
drop the ids of experts it does not hold (the kernels ignore ids outside ``[0, E)``) and a sum
over the ``expert`` axis; that is the parallelism layer's job and is not built yet.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tpu_plugin import envs
from tpu_plugin.layers import moe_offload
from tpu_plugin.layers.linear import Linear
from tpu_plugin.layers.mlp import GatedMLP

# The mesh axis name the stacked expert weights are annotated with (see the module docstring).
EXPERT_AXIS = "expert"
# Annotation of one ``[E, ...]`` expert weight: experts split over EXPERT_AXIS, rest replicated.
EXPERT_SHARDING = (EXPERT_AXIS, None, None)


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """What a family's MoE block looks like; built by the model from its Hugging Face config.

    The routing fields are :func:`tpu_kernels.fused_moe.routing.select_experts`'s arguments.
    ``shared_intermediate_size`` 0 means no shared experts; ``shared_name`` is the checkpoint's
    module name for them (``shared_experts`` in DeepSeek-V3, ``shared_expert`` in Qwen2-MoE).
    """

    hidden_size: int
    num_experts: int
    top_k: int
    intermediate_size: int  # of one routed expert (HF ``moe_intermediate_size``)
    activation: str = "silu"
    scoring: str = "softmax"
    renormalize: bool = True
    correction_bias: bool = False  # router carries ``e_score_correction_bias`` (DeepSeek-V3)
    num_groups: int | None = None
    topk_groups: int | None = None
    routed_scaling_factor: float = 1.0
    shared_intermediate_size: int = 0
    shared_name: str = "shared_experts"
    shared_gate: bool = False  # ``shared_expert_gate``: Linear(H, 1), sigmoid-scaled output


@functools.cache
def moe_kernel() -> Callable[..., jax.Array]:
    """The fused-experts function this process uses (``TPU_PLUGIN_MOE``, default ``auto``).

    ``auto`` is the Mosaic Pallas kernel on TPU and ``xla.fused_moe`` (expert-sorted row tiles)
    on CPU and GPU, where the Pallas TPU kernel runs only in interpret mode. ``reference`` is the
    dense spec (``E / k`` times the work).
    """
    from tpu_kernels.fused_moe import reference, tpu, xla

    choice = envs.moe_impl()
    if choice == "auto":
        choice = "pallas" if envs.target_platform() == "tpu" else "xla"
    if choice == "xla":
        return xla.fused_moe
    if choice == "reference":
        return reference.fused_moe
    from tpu_plugin.parallel.shard_kernels import sharded_moe

    # Per device under expert parallelism: Mosaic kernels are not partitioned by XLA.
    kernel = functools.partial(tpu.fused_moe, interpret=choice == "pallas-interpret")
    return sharded_moe(kernel, xla.fused_moe)


def _expert_param(shape: tuple[int, ...], dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=EXPERT_SHARDING, eager_sharding=False)


class TopKRouter(nnx.Module):
    """The router (HF ``gate``): ``logits = x @ weight.T`` in float32, and its optional bias.

    ``e_score_correction_bias`` (DeepSeek-V3) only shifts which experts are chosen, not their
    weights; it is kept in float32 like HF, because it is compared against sigmoid scores.
    """

    def __init__(self, hidden: int, num_experts: int, dtype: jnp.dtype, correction_bias: bool):
        self.weight = nnx.Param(jnp.zeros((num_experts, hidden), dtype))
        self.e_score_correction_bias = (
            nnx.Param(jnp.zeros((num_experts,), jnp.float32)) if correction_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return _router_logits(x, self.weight[...])


class FusedExperts(nnx.Module):
    """All routed experts' gated MLPs, stacked on a leading expert axis (annotated ``expert``)."""

    def __init__(
        self, num_experts: int, hidden: int, intermediate: int, dtype: jnp.dtype, act: str
    ):
        self.gate_up_proj = _expert_param((num_experts, 2 * intermediate, hidden), dtype)
        self.down_proj = _expert_param((num_experts, hidden, intermediate), dtype)
        self.act = act

    def __call__(self, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
        """The routed experts for given routing (the block fuses routing and this call)."""
        return moe_kernel()(
            x, weights, ids, self.gate_up_proj[...], self.down_proj[...], activation=self.act
        )


class SparseMoeBlock(nnx.Module):
    """``experts(x, select_experts(gate(x)))`` plus the optional (gated) shared experts.

    ``moe_index`` (the block's place among the model's MoE blocks, set by
    :func:`tpu_plugin.layers.moe_offload.number_blocks`) lets an offloaded step
    (:mod:`tpu_plugin.layers.moe_offload`) serve the routed experts from its device cache.
    """

    moe_index: int | None = None

    def __init__(self, spec: MoESpec, dtype: jnp.dtype):
        from tpu_kernels.fused_moe.reference import ACTIVATIONS

        if spec.activation not in ACTIVATIONS:
            raise ValueError(
                f"MoE activation {spec.activation!r} is not supported by the fused MoE kernels; "
                f"supported: {', '.join(ACTIVATIONS)}"
            )
        self.spec = spec
        self.gate = TopKRouter(spec.hidden_size, spec.num_experts, dtype, spec.correction_bias)
        self.experts = FusedExperts(
            spec.num_experts, spec.hidden_size, spec.intermediate_size, dtype, spec.activation
        )
        if spec.shared_intermediate_size:
            shared = GatedMLP(
                spec.hidden_size, spec.shared_intermediate_size, dtype, act=spec.activation
            )
            setattr(self, spec.shared_name, shared)
        if spec.shared_gate:
            self.shared_expert_gate = Linear(spec.hidden_size, 1, dtype)

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Routing weights ``[T, k]`` (float32) and expert ids ``[T, k]`` for tokens ``x``."""
        bias = self.gate.e_score_correction_bias
        override = moe_offload.router_override() if self.moe_index is not None else None
        if override is not None:
            override = functools.partial(override, self.moe_index)
        return _route(
            x, self.gate.weight[...], None if bias is None else bias[...], self.spec, override
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.gate.e_score_correction_bias
        offload = moe_offload.active() if self.moe_index is not None else None
        if offload is not None:  # routed experts from the device expert cache
            weights, ids = self.route(x)
            out = offload.experts(self.moe_index, x, weights, ids, self.spec.activation)
        elif moe_offload.router_override() is not None and self.moe_index is not None:
            weights, ids = self.route(x)
            out = moe_kernel()(
                x,
                weights,
                ids,
                self.experts.gate_up_proj[...],
                self.experts.down_proj[...],
                activation=self.spec.activation,
            )
        else:
            out = _routed_experts(
                x,
                self.gate.weight[...],
                None if bias is None else bias[...],
                self.experts.gate_up_proj[...],
                self.experts.down_proj[...],
                spec=self.spec,
                kernel=moe_kernel(),
            )
        if self.spec.shared_intermediate_size:
            shared = getattr(self, self.spec.shared_name)(x)
            if self.spec.shared_gate:
                shared = jax.nn.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


def _router_logits(x: jax.Array, router: jax.Array) -> jax.Array:
    """``x @ router.T`` accumulated in float32: routing decisions are made in float32."""
    return jax.lax.dot_general(
        x, router, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def _route(
    x: jax.Array,
    router: jax.Array,
    bias: jax.Array | None,
    spec: MoESpec,
    override: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    from tpu_kernels.fused_moe.routing import select_experts

    logits = _router_logits(x, router)
    return select_experts(
        logits if override is None else override(logits),
        spec.top_k,
        scoring=spec.scoring,
        renormalize=spec.renormalize,
        correction_bias=bias,
        num_groups=spec.num_groups,
        topk_groups=spec.topk_groups,
        routed_scaling_factor=spec.routed_scaling_factor,
    )


@functools.partial(jax.jit, static_argnames=("spec", "kernel"))
def _routed_experts(
    x: jax.Array,
    router: jax.Array,
    bias: jax.Array | None,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    *,
    spec: MoESpec,
    kernel: Callable[..., jax.Array],
) -> jax.Array:
    """Router, selection and routed experts as one program.

    Inside the runner's jitted step this is simply inlined; called op by op (the parity tests'
    eager forward) it compiles once per token count instead of once per routing op.
    """
    weights, ids = _route(x, router, bias, spec)
    return kernel(x, weights, ids, w_gate_up, w_down, activation=spec.activation)


def expert_stacking_rules(
    block: str,
    intermediate: int,
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
) -> dict[str, tuple[str, int, int | None]]:
    """Loader rules that stack the per-expert checkpoint tensors of the MoE block at ``block``.

    Checkpoints on the Hub store each expert apart (``{block}.experts.7.gate_proj.weight``;
    Mixtral names them ``w1``/``w3``/``w2``); ``names`` are the gate, up and down names. The
    result, returned by a model's ``stacked_checkpoint_tensors`` (see
    :mod:`tpu_plugin.models.loader`), maps a pattern (``*`` = expert index) to (parameter, first
    row, rows): gate fills rows ``[0, I)`` and up rows ``[I, 2I)`` of
    ``experts.gate_up_proj[e]``, down fills all of ``experts.down_proj[e]``. Checkpoints that
    already hold the fused ``experts.gate_up_proj`` / ``experts.down_proj`` load by name.
    """
    gate, up, down = names
    fused = f"{block}.experts.gate_up_proj"
    return {
        f"{block}.experts.*.{gate}.weight": (fused, 0, intermediate),
        f"{block}.experts.*.{up}.weight": (fused, intermediate, intermediate),
        f"{block}.experts.*.{down}.weight": (f"{block}.experts.down_proj", 0, None),
    }
