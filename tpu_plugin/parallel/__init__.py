"""Parallelism: the device mesh (:mod:`.mesh`) and every sharding rule (:mod:`.sharding`).

:func:`plan_for` is what the worker and runner call: vLLM's parallel options → a
:class:`~tpu_plugin.parallel.sharding.ShardingPlan` on this engine's devices.
"""

from __future__ import annotations

from typing import Any

import jax

from tpu_plugin.parallel.mesh import (
    ParallelConfigError,
    build_mesh,
    dp_device_slice,
    layout_from,
)
from tpu_plugin.parallel.sharding import ShardingPlan

__all__ = ["ParallelConfigError", "ShardingPlan", "plan_for"]


def engine_devices(parallel_config: Any) -> list[Any]:
    """The devices of this engine's mesh: this data-parallel rank's disjoint slice.

    Under vLLM's data parallelism every rank is its own engine process; local rank ``r`` takes
    devices ``[r * tp, (r + 1) * tp)`` of the host, so ranks never share a device (without DP,
    ``r = 0``: the first ``tp`` devices). Under Ray, each process's first ``tp / processes``.
    """
    devices = list(jax.devices())
    processes = jax.process_count()
    if processes > 1:
        # vLLM's Ray executor starts world_size = tp workers: each brings tp / processes of
        # its local devices (the first ones), in process order.
        tp = parallel_config.tensor_parallel_size
        if tp % processes:
            raise ParallelConfigError(
                f"--tensor-parallel-size {tp} does not divide over {processes} worker "
                "processes; choose a multiple of the number of workers"
            )
        per = tp // processes
        by_process = [[d for d in devices if d.process_index == p] for p in range(processes)]
        return [d for local in by_process for d in local[:per]]
    # vLLM sets the host-local DP rank in each engine process (dense models run every rank as
    # an independent engine with data_parallel_size reset to 1, data_parallel_index kept).
    rank = parallel_config.data_parallel_rank_local
    if rank is None:
        rank = getattr(parallel_config, "data_parallel_index", 0) or 0
    if rank == 0:
        return devices  # build_mesh takes the first tp and names the numbers if too few
    tp = parallel_config.tensor_parallel_size
    return [devices[i] for i in dp_device_slice(rank, tp, len(devices))]


def plan_for(vllm_config: Any) -> ShardingPlan:
    """The mesh and sharding layout of this engine from vLLM's config (start-up checks)."""
    parallel_config = vllm_config.parallel_config
    layout = layout_from(
        vllm_config.model_config.hf_text_config,
        parallel_config.tensor_parallel_size,
        bool(parallel_config.enable_expert_parallel),
    )
    mesh = build_mesh(layout.tp, engine_devices(parallel_config))
    return ShardingPlan(mesh, layout)
