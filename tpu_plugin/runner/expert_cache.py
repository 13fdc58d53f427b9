"""The runner's side of MoE offload: experts into host memory, the device cache, the metrics.

``TPU_PLUGIN_MOE_OFFLOAD=predict|lru`` (with ``TPU_PLUGIN_MOE_OFFLOAD_CACHE`` and
``_PREFETCH``, :mod:`tpu_plugin.envs`) turns it on, or vLLM's own engine argument
``--additional-config '{"moe_offload": {"policy": "predict", "cache": "0.25", "prefetch": 4}}'``
(``LLM(additional_config=...)``), which wins over the variables (:func:`offload_settings`).
:class:`ExpertOffload` then

- has the loader read the routed experts (``*.experts.gate_up_proj`` / ``down_proj``) into
  host NumPy arrays, so they never touch the device (a model larger than device memory loads);
- stacks them over MoE layers into one ``pinned_host`` array per projection
  (:class:`~tpu_plugin.layers.moe_offload.HostExperts`, part of the step's parameters), leaves
  empty placeholders in the model's parameters, and allocates the device expert cache before
  vLLM measures the memory left for KV pages (so the KV budget excludes it);
- rides the cache with the KV pages (:class:`~tpu_plugin.layers.moe_offload.OffloadedCaches`),
  writes each step's row-to-batch-slot map into it before the step (``prepare``), and logs
  what the cache did: hit rate, bytes host-to-device per token, the stall those bytes cost at
  the measured copy bandwidth.

Everything else is in the step program itself (:mod:`tpu_plugin.layers.moe_offload`).
One device only: tensor/expert parallelism with offload fails at start-up.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from vllm.logger import init_logger

from tpu_plugin import envs
from tpu_plugin.layers import moe_offload
from tpu_plugin.layers.moe_offload import (
    FETCHED,
    HITS,
    NEEDED,
    PADDING,
    PASSES,
    PREFETCHED,
    WASTED,
    ExpertCache,
    HostExperts,
    OffloadedCaches,
    OffloadSpec,
)
from tpu_plugin.startup import StartupError

logger = init_logger(f"vllm.{__name__}")

ROUTED = ("experts.gate_up_proj", "experts.down_proj")
CONFIG_KEY = "moe_offload"  # the key of vLLM's --additional-config
CONFIG_FIELDS = ("policy", "cache", "prefetch")
LOG_EVERY_S = 10.0  # seconds between metric lines while serving
HOST_KINDS = ("pinned_host", "unpinned_host")  # host memory kinds, preferred first


def is_routed_expert(name: str) -> bool:
    """Whether parameter ``name`` is a stacked routed-expert tensor (host memory)."""
    return name.endswith(ROUTED)


def offload_settings(additional_config: Any) -> tuple[str, tuple[str, float], int]:
    """``(policy, cache setting, prefetch)`` from vLLM's ``additional_config["moe_offload"]``
    (a policy name, or a dict of :data:`CONFIG_FIELDS`), each field missing there read from
    its ``TPU_PLUGIN_MOE_OFFLOAD*`` variable. vLLM passes ``--additional-config`` to every
    worker with the rest of its config, so the engine argument needs no environment."""
    given = (
        (additional_config or {}).get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    )
    if isinstance(given, str):
        given = {"policy": given}
    given = dict(given or {})
    unknown = sorted(set(given) - set(CONFIG_FIELDS))
    if unknown:
        raise StartupError(
            f"--additional-config {CONFIG_KEY} has unknown fields {unknown}; "
            f"give {', '.join(CONFIG_FIELDS)}"
        )
    try:
        return (
            envs.moe_offload(given.get("policy")),
            envs.moe_offload_cache(given.get("cache")),
            envs.moe_offload_prefetch(given.get("prefetch")),
        )
    except ValueError as error:
        raise StartupError(str(error)) from None


def memory_kind_shardings(mesh: Any) -> tuple[NamedSharding, NamedSharding]:
    """(device memory, host memory) shardings of ``mesh``'s one device."""
    kinds = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
    host = next((kind for kind in HOST_KINDS if kind in kinds), None)
    if host is None:
        raise StartupError(
            f"TPU_PLUGIN_MOE_OFFLOAD needs a host memory kind; this device has only "
            f"{sorted(kinds)}; unset TPU_PLUGIN_MOE_OFFLOAD"
        )
    return NamedSharding(mesh, P(), memory_kind="device"), NamedSharding(
        mesh, P(), memory_kind=host
    )


def cache_slots(setting: tuple[str, float], layers: int, experts: int, expert_bytes: int) -> int:
    """Device slots for ``TPU_PLUGIN_MOE_OFFLOAD_CACHE`` (envs.moe_offload_cache), at most all
    ``layers x experts``."""
    kind, value = setting
    if kind == "experts":
        slots = int(value) * layers
    elif kind == "fraction":
        slots = round(value * layers * experts)
    else:
        slots = int(value // expert_bytes)
    return min(slots, layers * experts)


@dataclasses.dataclass
class _Counters:
    """A snapshot of the cache's accumulated counters (host copies)."""

    stats: np.ndarray  # [L, 6]
    tokens: int
    at: float


def describe_counters(
    now: _Counters, before: _Counters | None, expert_bytes: int, bandwidth: float
) -> dict[str, float]:
    """Hit rate, host-to-device bytes per token and the estimated stall between snapshots.

    The counters are int32 and wrap; differences are taken modulo 2^32.
    """
    stats = now.stats.astype(np.int64)
    tokens = now.tokens
    if before is not None:
        stats = (stats - before.stats.astype(np.int64)) % 2**32
        tokens = (tokens - before.tokens) % 2**32
    total = stats.sum(axis=0)
    needed, fetched = int(total[NEEDED]), int(total[FETCHED])
    copies = fetched + int(total[PREFETCHED]) + int(total[WASTED]) + int(total[PADDING])
    per_token = copies * expert_bytes / max(tokens, 1)
    return {
        "tokens": float(tokens),
        "needed": float(needed),
        "hits": float(total[HITS]),
        "copies": float(copies),
        "hit_rate": int(total[HITS]) / needed if needed else 1.0,
        "fetched": float(fetched),
        "prefetched": float(total[PREFETCHED]),
        "wasted_prefetches": float(total[WASTED]),
        "overflow_passes": float(total[PASSES]),
        "padding_copies": float(total[PADDING]),
        "h2d_bytes_per_token": per_token,
        "demand_bytes": float(fetched * expert_bytes),
        "demand_stall_s": fetched * expert_bytes / bandwidth if bandwidth else 0.0,
    }


class ExpertOffload:
    """MoE offload for one runner (module doc); ``None`` from :meth:`for_runner` when off."""

    def __init__(
        self,
        policy: str,
        rows: int,
        plan: Any,
        cache: tuple[str, float] | None = None,
        prefetch: int | None = None,
    ):
        """``cache`` / ``prefetch``: the settings of ``TPU_PLUGIN_MOE_OFFLOAD_CACHE`` /
        ``_PREFETCH`` (envs.moe_offload_cache's form), read from the environment if None."""
        self.policy = policy
        self.cache_setting = cache or envs.moe_offload_cache()
        self.prefetch = envs.moe_offload_prefetch() if prefetch is None else prefetch
        self.rows = rows
        self.plan = plan
        self.device, self.host_sharding = memory_kind_shardings(plan.mesh)
        self.spec: OffloadSpec | None = None
        self.host: HostExperts | None = None
        self.cache: ExpertCache | None = None
        self.expert_bytes = 0
        self.dtype = np.dtype(np.float32)
        self.bandwidth = 0.0
        self._owners: dict[int, str] = {}  # batch slot -> request last seen there
        self._pending: tuple[jax.Array, jax.Array, float] | None = None
        self._last: _Counters | None = None
        self._started = time.monotonic()
        self._next_log = self._started + LOG_EVERY_S

    is_routed_expert = staticmethod(is_routed_expert)  # the loader's host-memory predicate

    def wrap(self, forward: Any) -> Any:
        """The runner's forward with its MoE layers served from the cache (moe_offload)."""
        from tpu_plugin.layers.moe import moe_kernel

        return moe_offload.wrap_forward(forward, self.spec, self.device, moe_kernel)

    @classmethod
    def for_runner(cls, runner: Any, plan: Any) -> ExpertOffload | None:
        """The runner's offload, or None when it is off (:func:`offload_settings`); fails at
        start-up (one line naming the fix) where it cannot run."""
        config = getattr(getattr(runner, "vllm_config", None), "additional_config", None)
        policy, cache, prefetch = offload_settings(config)
        if policy == "off":
            return None
        if plan.layout.tp > 1:
            raise StartupError(
                "TPU_PLUGIN_MOE_OFFLOAD runs on one device; drop --tensor-parallel-size / "
                "--enable-expert-parallel or unset TPU_PLUGIN_MOE_OFFLOAD"
            )
        if envs.moe_impl() == "reference":
            raise StartupError(
                "TPU_PLUGIN_MOE=reference runs every cache slot densely; use TPU_PLUGIN_MOE=auto "
                "with TPU_PLUGIN_MOE_OFFLOAD"
            )
        return cls(policy, runner.max_num_seqs, plan, cache, prefetch)

    # ---- start-up --------------------------------------------------------------------------
    def _configure(self, model: nnx.Module) -> list[Any]:
        """The model's MoE blocks in layer order; sets :attr:`spec` and the expert size."""
        from tpu_plugin.layers.moe import SparseMoeBlock

        layers = moe_offload.number_blocks(model)
        if not layers:
            raise StartupError(
                f"TPU_PLUGIN_MOE_OFFLOAD is set but {type(model).__name__} has no "
                "mixture-of-experts layers; unset it"
            )
        blocks = sorted(
            (m for _, m in nnx.iter_graph(model) if isinstance(m, SparseMoeBlock)),
            key=lambda m: m.moe_index,
        )
        spec0 = blocks[0].spec
        self.dtype = np.dtype(blocks[0].experts.gate_up_proj.get_value().dtype)
        experts = spec0.num_experts
        self.expert_bytes = 3 * spec0.intermediate_size * spec0.hidden_size * self.dtype.itemsize
        slots = cache_slots(self.cache_setting, layers, experts, self.expert_bytes)
        try:
            self.spec = OffloadSpec(
                self.policy,
                layers,
                experts,
                spec0.top_k,
                slots,
                self._spec_prefetch(self.policy),
                self.rows,
                envs.moe_offload_copy_chunk(),
            )
        except ValueError as error:
            raise StartupError(str(error)) from None
        return blocks

    def _spec_prefetch(self, policy: str) -> int:
        """Prefetch copies a step: the setting for ``predict``, none for ``lru``."""
        return self.prefetch if policy == "predict" else 0

    def variant(self, policy: str, copy_chunk: int | None = None) -> ExpertOffload:
        """This offload's host experts under another policy (and demand copies per loop
        iteration, ``TPU_PLUGIN_MOE_OFFLOAD_COPY_CHUNK``), with fresh policy state and no
        device cache yet (``fresh_cache`` builds one): benchmarks compare policies without
        moving the experts to host memory again."""
        other = ExpertOffload(policy, self.rows, self.plan, self.cache_setting, self.prefetch)
        other.host, other.expert_bytes = self.host, self.expert_bytes
        other.dtype, other.bandwidth = self.dtype, self.bandwidth
        other.spec = dataclasses.replace(
            self.spec,
            policy=policy,
            prefetch=self._spec_prefetch(policy),
            copy_chunk=copy_chunk or self.spec.copy_chunk,
        )
        return other

    def abstract(self, model: nnx.Module) -> HostExperts:
        """Shapes only, for the TPU planner (``tools/tpu_aot.py``): ``model`` from
        ``nnx.eval_shape``; its experts become empty placeholders, :attr:`cache` an abstract
        device cache; returns the abstract host stacks (``ShapeDtypeStruct`` in host memory)."""
        blocks = self._configure(model)
        spec0, keys = blocks[0].spec, self.spec.keys
        inter, hidden = spec0.intermediate_size, spec0.hidden_size
        for block in blocks:
            block.experts.gate_up_proj.set_value(
                jax.ShapeDtypeStruct((0, 2 * inter, hidden), self.dtype)
            )
            block.experts.down_proj.set_value(jax.ShapeDtypeStruct((0, hidden, inter), self.dtype))
        self.host = HostExperts(
            jax.ShapeDtypeStruct(
                (keys, 2 * inter, hidden), self.dtype, sharding=self.host_sharding
            ),
            jax.ShapeDtypeStruct((keys, hidden, inter), self.dtype, sharding=self.host_sharding),
        )
        first = jax.ShapeDtypeStruct(first_keys(self.spec).shape, np.int32)
        shapes = jax.eval_shape(self._cache_builder(), self.host, first)
        self.cache = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.device), shapes
        )
        return self.host

    def take_experts(self, model: nnx.Module) -> HostExperts:
        """Moves the loaded model's routed experts into host memory (one stack per
        projection), leaves empty placeholders and allocates the device cache."""
        blocks = self._configure(model)
        spec0, dtype = blocks[0].spec, self.dtype
        layers, experts = self.spec.num_layers, self.spec.num_experts
        inter, hidden = spec0.intermediate_size, spec0.hidden_size
        slots, prefetch = self.spec.slots, self.spec.prefetch
        gate_up = np.empty((layers * experts, 2 * inter, hidden), dtype)
        down = np.empty((layers * experts, hidden, inter), dtype)
        for block in blocks:
            rows = slice(block.moe_index * experts, (block.moe_index + 1) * experts)
            gate_up[rows] = np.asarray(block.experts.gate_up_proj.get_value())
            down[rows] = np.asarray(block.experts.down_proj.get_value())
            block.experts.gate_up_proj.set_value(jnp.zeros((0, 2 * inter, hidden), dtype))
            block.experts.down_proj.set_value(jnp.zeros((0, hidden, inter), dtype))
        self.host = HostExperts(
            jax.device_put(gate_up, self.host_sharding), jax.device_put(down, self.host_sharding)
        )
        del gate_up, down
        self.cache = self.fresh_cache()
        self.bandwidth = measure_fetch_bandwidth(self.host, self.device)
        logger.info(
            "MoE offload (%s): %d MoE layers x %d experts of %.1f MiB in %s memory (%.2f GiB); "
            "device cache of %d slots (%.0f%% of the experts, %.2f GiB); prefetch %d a step; "
            "host-to-device copies at %.1f GB/s",
            self.policy,
            layers,
            experts,
            self.expert_bytes / 2**20,
            self.host_sharding.memory_kind,
            layers * experts * self.expert_bytes / 2**30,
            slots,
            100 * slots / (layers * experts),
            (slots + 1) * self.expert_bytes / 2**30,
            prefetch,
            self.bandwidth / 1e9,
        )
        return self.host

    def fresh_cache(self) -> ExpertCache:
        """A new device cache holding :func:`first_keys`, copied from host memory by the
        step program's own copy (``moe_offload.fetch``); zeroed counters and histories. Used at
        start-up, and by benchmarks that compare runs from the same starting cache."""
        self._owners.clear()  # the histories restart with the cache
        keys = jax.device_put(first_keys(self.spec), self.device)
        return self._cache_builder()(self.host, keys)

    def _cache_builder(self) -> Any:
        """The jitted ``(host stacks, first keys) -> ExpertCache`` of :meth:`fresh_cache`."""
        spec, device = self.spec, self.device

        @jax.jit
        def build(host: HostExperts, keys: jax.Array) -> ExpertCache:
            def one(i: jax.Array, arrays: tuple[jax.Array, jax.Array]) -> tuple:
                gate_up, down = arrays
                return (
                    lax.dynamic_update_index_in_dim(
                        gate_up, moe_offload.fetch(host.gate_up, keys[i], device), i, 0
                    ),
                    lax.dynamic_update_index_in_dim(
                        down, moe_offload.fetch(host.down, keys[i], device), i, 0
                    ),
                )

            rows = spec.slots + 1
            empty = (
                jnp.zeros((rows, *host.gate_up.shape[1:]), host.gate_up.dtype),
                jnp.zeros((rows, *host.down.shape[1:]), host.down.dtype),
            )
            gate_up, down = lax.fori_loop(0, keys.shape[0], one, empty)
            return moe_offload.initial_cache(spec, gate_up, down, keys)

        return build

    def attach(self, kv_caches: list) -> OffloadedCaches:
        """The KV pages with the expert cache riding along (the runner's ``kv_caches``)."""
        return OffloadedCaches(kv_caches, self.cache)

    # ---- every step ------------------------------------------------------------------------
    def prepare(self, kv_caches: OffloadedCaches, host: Any) -> OffloadedCaches:
        """Writes the step's row -> batch slot map (and which rows hold a request new to its
        slot, whose history restarts) into the cache; logs the metrics now and then."""
        row_slot = np.full(self.rows, -1, np.int32)
        fresh = np.zeros(self.rows, bool)
        for i, (req_id, slot) in enumerate(zip(host.req_ids, host.slots, strict=True)):
            row_slot[i] = slot
            if self._owners.get(int(slot)) != req_id:
                fresh[i] = True
                self._owners[int(slot)] = req_id
        cache = kv_caches.experts
        if time.monotonic() >= self._next_log:
            self._log(cache)
        cache = cache._replace(
            row_slot=jax.device_put(row_slot, self.device),
            row_fresh=jax.device_put(fresh, self.device),
        )
        return kv_caches._replace(experts=cache)

    def _log(self, cache: ExpertCache) -> None:
        """Logs the counters copied at the last log point (resolved by now), and copies the
        current ones (on the device: the step about to run donates the cache)."""
        self._next_log = time.monotonic() + LOG_EVERY_S
        if self._pending is not None:
            stats, tokens, at = self._pending
            now = _Counters(np.asarray(stats), int(tokens), at)
            if self._last is not None:
                self.log_counters(now, self._last)
            self._last = now
        self._pending = (jnp.copy(cache.stats), jnp.copy(cache.tokens), time.monotonic())

    def log_counters(self, now: _Counters, before: _Counters | None) -> dict[str, float]:
        """One metrics line for the interval between two snapshots; returns its numbers."""
        m = describe_counters(now, before, self.expert_bytes, self.bandwidth)
        if m["tokens"]:
            seconds = now.at - (before.at if before is not None else self._started)
            logger.info(
                "MoE offload (%s): %d tokens in %.0f s: cache hit rate %.1f%%, %.2f MB "
                "host-to-device per token (%d demand copies, %d prefetched, %d wasted), demand "
                "stall %.2f ms per token at %.1f GB/s, %d overflow passes",
                self.policy,
                m["tokens"],
                seconds,
                100 * m["hit_rate"],
                m["h2d_bytes_per_token"] / 1e6,
                m["fetched"],
                m["prefetched"],
                m["wasted_prefetches"],
                1e3 * m["demand_stall_s"] / m["tokens"],
                self.bandwidth / 1e9,
                m["overflow_passes"],
            )
        return m


def worker_counters(worker: Any) -> dict[str, float]:
    """The expert cache's counters since start-up, from vLLM's worker, logged as well
    (``LLM.collective_rpc(worker_counters)``: benchmarks, tests). Includes the start-up
    precompilation's steps, whose dummy tokens route like any other."""
    runner = worker.model_runner
    offload = runner._offload
    if offload is None:
        raise ValueError("MoE offload is off in this engine")
    m = offload.log_counters(counters(runner.kv_caches.experts), None)
    return m | {"bandwidth": offload.bandwidth, "expert_bytes": float(offload.expert_bytes)}


def first_keys(spec: OffloadSpec) -> np.ndarray:
    """The experts the cache starts with: the same number of each layer's first experts."""
    per_layer = spec.slots // spec.num_layers
    extra = spec.slots - per_layer * spec.num_layers
    keys = [
        layer * spec.num_experts + e
        for layer in range(spec.num_layers)
        for e in range(per_layer + (layer < extra))
    ]
    return np.asarray(keys, np.int32)


def counters(cache: ExpertCache) -> _Counters:
    """The cache's counters now (waits for the step that produced ``cache``)."""
    return _Counters(np.asarray(cache.stats), int(cache.tokens), time.monotonic())


def measure_fetch_bandwidth(host: HostExperts, device: Any, copies: int = 8) -> float:
    """Bytes/s of the step program's own host-to-device copy (``moe_offload.fetch``), for the
    stall estimate: ``copies`` experts in one jitted program (returned, so every byte moves),
    the second run timed."""
    copies = min(copies, host.gate_up.shape[0])

    @jax.jit
    def fetch_some(gate_up: jax.Array, down: jax.Array) -> tuple[jax.Array, jax.Array]:
        keys = [jnp.int32(key) for key in range(copies)]
        return (
            jnp.concatenate([moe_offload.fetch(gate_up, k, device) for k in keys]),
            jnp.concatenate([moe_offload.fetch(down, k, device) for k in keys]),
        )

    jax.block_until_ready(fetch_some(host.gate_up, host.down))
    start = time.perf_counter()
    out = jax.block_until_ready(fetch_some(host.gate_up, host.down))
    seconds = time.perf_counter() - start
    return sum(x.nbytes for x in out) / max(seconds, 1e-9)
