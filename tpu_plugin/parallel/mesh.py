"""The device mesh of one engine, and the start-up checks of the parallel sizes.

One JAX process drives all the devices of its host (JAX's single-controller model), so vLLM's
``--tensor-parallel-size N`` does not start N workers here: the platform keeps vLLM's
single-worker (``uni``) executor and the worker builds a mesh over N devices; parameters and KV
pages carry shardings on it (:mod:`tpu_plugin.parallel.sharding`) and XLA inserts the
collectives. Under Ray (``--distributed-executor-backend ray``) there is one worker per process
and the mesh spans the devices of every process (``jax.distributed``).

Mesh axes: ``("data", "model")``. ``model`` carries tensor parallelism and, with
``--enable-expert-parallel``, the experts too (vLLM's meaning: the expert-parallel group is the
tensor-parallel group). ``data`` is always 1 inside one engine: data parallelism is vLLM's own,
one engine process per rank, each with its own devices (:func:`dp_device_slice`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from tpu_plugin.startup import StartupError

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)


class ParallelConfigError(StartupError):
    """Parallel sizes this model or host cannot run; the message names the numbers."""


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """What the sharding rules need to know about the run (plain data, hashable)."""

    tp: int
    expert_parallel: bool
    num_heads: int
    num_kv_heads: int
    num_experts: int = 0

    @property
    def kv_heads_split(self) -> bool:
        """KV heads are split over ``model`` when they divide evenly, else replicated."""
        return self.num_kv_heads % self.tp == 0


def num_experts_of(hf_config: Any) -> int:
    """Routed experts of an MoE config (0 for a dense model), under the names HF uses."""
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(hf_config, name, None)
        if value:
            return int(value)
    return 0


def layout_from(hf_config: Any, tp: int, expert_parallel: bool) -> ParallelLayout:
    """Checks ``tp`` against the model and returns the layout; raises naming the numbers."""
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    experts = num_experts_of(hf_config)
    if tp < 1:
        raise ParallelConfigError(f"--tensor-parallel-size must be at least 1 (got {tp})")
    if heads % tp:
        raise ParallelConfigError(
            f"--tensor-parallel-size {tp} does not divide the model's {heads} attention heads; "
            f"choose a divisor of {heads}"
        )
    if kv_heads % tp and tp % kv_heads:
        raise ParallelConfigError(
            f"--tensor-parallel-size {tp} and the model's {kv_heads} KV heads: one must divide "
            f"the other (KV heads are split when {kv_heads} % {tp} == 0, replicated when "
            f"{tp} % {kv_heads} == 0); choose another size"
        )
    if expert_parallel:
        if not experts:
            raise ParallelConfigError(
                "--enable-expert-parallel needs a mixture-of-experts model; this one has no "
                "experts, drop the flag"
            )
        if experts % tp:
            raise ParallelConfigError(
                f"--enable-expert-parallel over {tp} devices does not divide the model's "
                f"{experts} experts; choose a --tensor-parallel-size that divides {experts}"
            )
    return ParallelLayout(tp, expert_parallel, heads, kv_heads, experts)


def check_parallel_config(parallel_config: Any, hf_config: Any | None) -> ParallelLayout | None:
    """The platform's start-up check of vLLM's parallel options (before any engine starts)."""
    if parallel_config.pipeline_parallel_size > 1:
        raise ParallelConfigError(
            f"tpu-plugin does not support pipeline parallelism yet (--pipeline-parallel-size "
            f"{parallel_config.pipeline_parallel_size}); use --tensor-parallel-size instead"
        )
    for option in ("prefill_context_parallel_size", "decode_context_parallel_size"):
        size = getattr(parallel_config, option, 1)
        if size > 1:
            flag = "--" + option.replace("_", "-")
            raise ParallelConfigError(
                f"tpu-plugin does not support context parallelism yet ({flag} {size}); drop it"
            )
    if hf_config is None:
        return None
    return layout_from(
        hf_config,
        parallel_config.tensor_parallel_size,
        bool(parallel_config.enable_expert_parallel),
    )


def build_mesh(tp: int, devices: list[Any] | None = None) -> Mesh:
    """A ``(data=1, model=tp)`` mesh over the first ``tp`` devices (all processes' devices).

    Raises naming the numbers when fewer devices exist than asked for.
    """
    devices = list(jax.devices()) if devices is None else list(devices)
    if tp > len(devices):
        raise ParallelConfigError(
            f"--tensor-parallel-size {tp} asks for {tp} devices but JAX sees {len(devices)} "
            f"({devices[0].platform if devices else 'none'}); lower it to at most "
            f"{len(devices)}"
        )
    return Mesh(np.array(devices[:tp]).reshape(1, tp), MESH_AXES)


def dp_device_slice(dp_rank_local: int, devices_per_rank: int, available: int) -> range:
    """The device indices of local data-parallel rank ``dp_rank_local`` (disjoint per rank).

    Raises naming the numbers when the host does not have enough devices for every rank.
    """
    stop = (dp_rank_local + 1) * devices_per_rank
    if stop > available:
        raise ParallelConfigError(
            f"data-parallel rank {dp_rank_local} needs devices "
            f"[{stop - devices_per_rank}, {stop}) ({devices_per_rank} per rank) but the host "
            f"has {available}; lower --data-parallel-size or --tensor-parallel-size"
        )
    return range(stop - devices_per_rank, stop)


def check_executor(parallel_config: Any) -> None:
    """vLLM executors the plugin runs under: ``uni`` (also for ``mp``: one process drives all
    local devices) and ``ray`` (one worker per process, one global mesh)."""
    backend = parallel_config.distributed_executor_backend
    if backend in (None, "mp", "uni", "ray"):
        return
    raise ParallelConfigError(
        f"tpu-plugin runs under the uni, mp or ray executors, not {backend!r}; set "
        "--distributed-executor-backend ray for several processes or drop the option"
    )


# The Ray resource one vLLM Ray worker (one JAX process) asks for, per backend. Ray detects
# TPU and GPU hosts itself. vLLM's Ray executor only accepts resources Ray knows as
# accelerators, so CPU workers use the "TPU" slot too: a CPU cluster declares one per worker,
# e.g. ``ray start --head --resources='{"TPU": 2}'`` (JAX ignores the TPU_VISIBLE_CHIPS Ray sets).
RAY_DEVICE_KEYS = {"tpu": "TPU", "gpu": "GPU", "cpu": "TPU"}
