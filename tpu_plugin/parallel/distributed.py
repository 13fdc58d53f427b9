"""Several worker processes, one global mesh: ``jax.distributed`` under vLLM's Ray executor.

With ``--distributed-executor-backend ray`` vLLM's own Ray executor starts ``world_size``
workers (one per bundle of its placement group) and sends every one of them the same calls.
Each worker here joins one JAX multi-controller job: process ``rank`` of ``world_size``, the
coordinator at the address vLLM already picked for its distributed init (the plugin starts no
``torch.distributed`` group, so the port is free for JAX). Every process then owns its local
devices, the mesh spans all of them, and each step runs the same SPMD program everywhere.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import jax
from vllm.logger import init_logger

from tpu_plugin.parallel.mesh import ParallelConfigError

logger = init_logger(__name__)


def uses_multiple_processes(parallel_config: Any) -> bool:
    """Ray with more than one worker: one JAX process per worker."""
    return parallel_config.distributed_executor_backend == "ray" and parallel_config.world_size > 1


def _host_port(distributed_init_method: str) -> tuple[str, int]:
    parsed = urlparse(distributed_init_method)
    if parsed.scheme != "tcp" or not parsed.hostname or not parsed.port:
        raise ParallelConfigError(
            f"the Ray executor gave distributed init method {distributed_init_method!r}; "
            "tpu-plugin needs a tcp://host:port address to start jax.distributed"
        )
    return parsed.hostname, parsed.port


def coordinator_address(distributed_init_method: str, rank: int, world: int) -> str:
    """The JAX coordinator's ``host:port``, agreed through vLLM's rendezvous store.

    vLLM's Ray executor (v2) hands every worker the address of a live ``torch`` TCP store
    held by rank 0. Rank 0 picks a free port on its host and publishes ``host:port`` there;
    the others read it. Without a store at that address (vLLM's older Ray executor only
    reserves a port), the address itself is the coordinator.
    """
    from datetime import timedelta

    from torch.distributed import TCPStore
    from vllm.utils.network_utils import get_open_port

    host, port = _host_port(distributed_init_method)
    try:
        store = TCPStore(
            host, port, world, is_master=False, timeout=timedelta(seconds=60), use_libuv=True
        )
    except Exception:  # noqa: BLE001 - no store there: the port is free for JAX
        return f"{host}:{port}"
    key = "tpu_plugin/jax_coordinator"
    if rank == 0:
        store.set(key, f"{host}:{get_open_port()}")
    return store.get(key).decode()


def init_distributed(parallel_config: Any, rank: int, distributed_init_method: str) -> None:
    """Joins the JAX job of all workers (no-op for the single-process executors).

    Must run before JAX initialises its backend (the first ``jax.devices()``).
    """
    if not uses_multiple_processes(parallel_config):
        return
    if jax.distributed.is_initialized():
        return
    world = parallel_config.world_size
    address = coordinator_address(distributed_init_method, rank, world)
    logger.info("jax.distributed: process %d of %d, coordinator %s", rank, world, address)
    jax.distributed.initialize(coordinator_address=address, num_processes=world, process_id=rank)
