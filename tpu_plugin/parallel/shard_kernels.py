"""Mosaic (Pallas TPU) kernels inside a tensor- or expert-parallel step: one ``shard_map`` each.

XLA partitions plain JAX ops by the shardings of their operands, but a Mosaic kernel is an
opaque custom call: the TPU compiler refuses to partition it ("Mosaic kernels cannot be
automatically partitioned. Please wrap the call in a shard_map"). So the runner's jitted step
traces the model inside :func:`sharded_step`, which makes the step's :class:`ShardingPlan`
known to the kernel wrappers below, and each wrapper runs its kernel per device on that
device's shard, with the specs the plan gave the operands (:mod:`.sharding`):

- ragged paged attention: query heads and the output split over ``model``; KV pages split on
  their KV heads when those divide over the devices. When they do not (more devices than KV
  heads) the pages are replicated and every device attends with all heads (redundant work, no
  copy of the cache), and the output is then sliced back to the device's heads by XLA;
- fused MoE under expert parallelism: each device holds ``E / N`` whole experts, runs the
  kernel for the assignments to its experts (ids of other devices' experts fall outside its
  ``[0, E / N)`` and are dropped by the kernel) and the partial outputs are summed over
  ``model``. Tensor parallelism *inside* each expert splits ``gate_up_proj``'s ``2I`` rows
  contiguously, so a device holds gate rows or up rows, not matching pairs: no per-device
  kernel can run on that layout, and the step uses the partitionable XLA form instead
  (``tpu_kernels.fused_moe.xla``), logged once.

Outside :func:`sharded_step` (one device, the torchax path, kernel tests) the wrappers call the
kernel unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.sharding import PartitionSpec as P
from vllm.logger import init_logger

from tpu_plugin.parallel.mesh import MODEL_AXIS
from tpu_plugin.parallel.sharding import ShardingPlan

logger = init_logger(f"vllm.{__name__}")

_PLAN: contextvars.ContextVar[ShardingPlan | None] = contextvars.ContextVar(
    "tpu_plugin_sharded_step", default=None
)


@contextlib.contextmanager
def sharded_step(plan: ShardingPlan) -> Iterator[None]:
    """Traces the enclosed model call as a step on ``plan``'s mesh (see the module doc)."""
    token = _PLAN.set(plan if plan.layout.tp > 1 else None)
    try:
        yield
    finally:
        _PLAN.reset(token)


def _active() -> ShardingPlan | None:
    return _PLAN.get()


def sharded_attention(kernel: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``kernel`` (ragged paged attention's signature) run per device inside a sharded step."""

    @functools.wraps(kernel)
    def run(
        queries: jax.Array,
        k_pages: jax.Array,
        v_pages: jax.Array,
        kv_lens: jax.Array,
        page_indices: jax.Array,
        query_start_loc: jax.Array,
        num_seqs: jax.Array,
        **kwargs: Any,
    ) -> jax.Array:
        plan = _active()
        tables = (kv_lens, page_indices, query_start_loc, num_seqs)
        if plan is None:
            return kernel(queries, k_pages, v_pages, *tables, **kwargs)
        split = plan.layout.kv_heads_split and k_pages.shape[2] % plan.layout.tp == 0
        heads = P(None, MODEL_AXIS, None) if split else P()
        pages = P(None, None, MODEL_AXIS, None) if split else P()
        body = jax.shard_map(
            functools.partial(kernel, **kwargs),
            mesh=plan.mesh,
            in_specs=(heads, pages, pages, P(), P(), P(), P()),
            out_specs=heads,
            check_vma=False,
        )
        return body(queries, k_pages, v_pages, *tables)

    return run


@functools.cache
def _note_tp_inside_experts() -> None:
    logger.info(
        "tensor parallelism inside MoE experts: the routed experts run in XLA's partitionable "
        "form (tpu_kernels.fused_moe.xla); --enable-expert-parallel runs the Pallas kernel"
    )


def sharded_moe(
    kernel: Callable[..., jax.Array], partitionable: Callable[..., jax.Array]
) -> Callable[..., jax.Array]:
    """``kernel`` (fused MoE's signature) per device inside a sharded step (module doc).

    ``partitionable`` is the XLA form the step uses for tensor parallelism inside experts.
    """

    @functools.wraps(kernel)
    def run(
        x: jax.Array,
        weights: jax.Array,
        expert_ids: jax.Array,
        w_gate_up: jax.Array,
        w_down: jax.Array,
        **kwargs: Any,
    ) -> jax.Array:
        plan = _active()
        if plan is None:
            return kernel(x, weights, expert_ids, w_gate_up, w_down, **kwargs)
        tp, num_experts = plan.layout.tp, w_gate_up.shape[0]
        if not plan.layout.expert_parallel or num_experts % tp:
            _note_tp_inside_experts()
            return partitionable(x, weights, expert_ids, w_gate_up, w_down, **kwargs)
        local_experts = num_experts // tp

        def per_device(x, weights, ids, w_gate_up, w_down):
            first = jax.lax.axis_index(MODEL_AXIS) * local_experts
            # Other devices' experts fall outside [0, local_experts): the kernel drops them.
            local_ids = ids - first.astype(ids.dtype)
            partial = kernel(x, weights, local_ids, w_gate_up, w_down, **kwargs)
            return jax.lax.psum(partial, MODEL_AXIS)

        experts = P(MODEL_AXIS, None, None)
        body = jax.shard_map(
            per_device,
            mesh=plan.mesh,
            in_specs=(P(), P(), P(), experts, experts),
            out_specs=P(),
            check_vma=False,
        )
        return body(x, weights, expert_ids, w_gate_up, w_down)

    return run


def sharded_matmul(
    kernel: Callable[..., jax.Array], name: str, weight_shape: tuple[int, ...] | None = None
) -> Callable[..., jax.Array]:
    """A quantized-matmul kernel (``x [M, K]``, ``w [N, K]``, ``w_scale [N]``) per device
    inside a sharded step; ``name`` is the layer's module path, whose weight's spec
    (:func:`~tpu_plugin.parallel.sharding.param_spec`) says how it is split.

    Column-split layers (``q_proj``, ``gate_proj``, …) multiply the replicated input by the
    device's rows; row-split ones (``o_proj``, ``down_proj``) their input slice by their
    columns, and the partial products are summed over ``model``. A W8A8 row-split layer then
    quantizes each device's slice of a row with that slice's own scale.
    """
    from tpu_plugin.parallel.sharding import param_spec

    @functools.wraps(kernel)
    def run(x: jax.Array, w: jax.Array, w_scale: jax.Array, **kwargs: Any) -> jax.Array:
        plan = _active()
        if plan is None:
            return kernel(x, w, w_scale, **kwargs)
        # the parameter's own shape (a fused weight ``[groups, rows, K]`` is multiplied as
        # its 2-D view ``w``): its first axis split is a row split of ``w``, its last a K split
        shape = tuple(weight_shape or w.shape)
        full = tuple(param_spec(f"{name}.weight", shape, plan.layout))
        full = full + (None,) * (len(shape) - len(full))
        if full and full[0] == MODEL_AXIS:
            spec: tuple = (MODEL_AXIS, None)
        elif full and full[-1] == MODEL_AXIS:
            spec = (None, MODEL_AXIS)
        else:
            spec = ()
        x_scale = kwargs.pop("x_scale", None)
        operands = (x, w, w_scale) + (() if x_scale is None else (x_scale,))

        def body(x, w, w_scale, *x_scale):
            out = kernel(x, w, w_scale, x_scale=x_scale[0] if x_scale else None, **kwargs)
            return jax.lax.psum(out, MODEL_AXIS) if row else out

        row = tuple(spec) == (None, MODEL_AXIS)
        if tuple(spec) == (MODEL_AXIS, None):  # column split
            specs, out = (P(), P(MODEL_AXIS, None), P(MODEL_AXIS)), P(None, MODEL_AXIS)
        elif row:
            specs, out = (P(None, MODEL_AXIS), P(None, MODEL_AXIS), P()), P()
        else:  # replicated: every device multiplies the whole weight
            specs, out = (P(), P(), P()), P()
        body = jax.shard_map(
            body,
            mesh=plan.mesh,
            in_specs=specs + ((P(),) if x_scale is not None else ()),
            out_specs=out,
            check_vma=False,
        )
        return body(*operands)

    return run
