"""MoE experts in host memory: the device expert cache, managed inside the step program.

With ``TPU_PLUGIN_MOE_OFFLOAD`` (:mod:`tpu_plugin.runner.expert_cache` sets it up) the routed
experts of every MoE layer live in host memory (JAX memory kind ``pinned_host``), stacked over
layers: ``gate_up [L * E, 2I, H]`` and ``down [L * E, H, I]``, expert ``e`` of MoE layer ``l``
at row ``l * E + e`` (:class:`HostExperts`). The device holds a cache of ``N`` expert slots
shared by all layers (:class:`ExpertCache`, ``[N + 1, ...]``: slot ``N`` is a trash slot,
never read). Attention, dense layers, routers and shared experts stay on the device.

Everything happens inside the runner's one jitted program per step; the cache is donated and
returned with the KV pages (:class:`OffloadedCaches`), so no host round trip decides anything
between layers or steps. In each MoE layer, after the router:

1. the layer's distinct routed experts are looked up in ``slot_of``; the missing ones are
   copied from host memory (``dynamic_slice`` of the host stack, ``device_put`` to device
   memory: a DMA on TPU and GPU) into the lowest-scoring slots, in a loop as long as the misses;
2. the ids are mapped to slots and the fused-MoE kernel runs *once* on the whole cache array
   (``[N + 1, 2I, H]``; the kernel reads only the slots it is given), so the numbers are the
   resident path's: the kernel interface is unchanged, and so is every row's arithmetic.

A slot's score orders eviction: ``predicted use x 2^16 + recency``, the slot holding the
lowest goes first; slots of experts the current layer routes to are never victims. Policies:

- ``lru``: no prediction; the score is recency only (the baseline).
- ``predict``: a per-request expert-activation history ``[rows, L, E]`` (counts of each
  request's routed experts per layer, kept on the device by the runner's batch slot) predicts
  each running request's next routing (its own counts, smoothed with a decayed population
  prior for requests with little history); the predicted use of ``(l, e)`` is the expected
  number of this step's requests routing to it. It orders eviction and drives prefetch:
  ``P`` copies a step (``TPU_PLUGIN_MOE_OFFLOAD_PREFETCH``), one per group of consecutive
  layers, each the group's most wanted non-resident expert, picked at the start of the step
  (so the copy can start then) and written into the cache just before the group's first layer
  (group 0: at the end of the step, for the next one): the copies overlap the compute of the
  layers before them. A copy is written to the trash slot when it would evict something
  wanted as much.

Overflow: a layer whose step routes to more distinct experts than the cache holds (only when
``N`` is below ``E``, e.g. a prefill on a tiny cache) runs in passes of at most ``N`` experts,
each pass computing its experts' per-choice outputs with the same kernel (weight 1, one choice
per row) and the weighted sum done last, as the kernel does it: exact in float32; in bf16 each
expert's output is rounded before the sum.

On GPU (H200 profile of a 12-layer Qwen3-30B-A3B-shaped decode step, NOTES_moe_offload.md) a
demand copy is two host-memory slices read at ~50 GB/s (0.19 ms for a 9.4 MB expert), and XLA
reads the loop's condition on the host at every iteration: ~70 us of idle device a copy.
``copy_chunk`` (``TPU_PLUGIN_MOE_OFFLOAD_COPY_CHUNK``) issues that many copies an iteration,
the last iteration's spares written to the trash slot (measured: spare bytes cost more than the
syncs saved, so the default stays 1). Each layer's kernel output is tied to the cache arrays
(:func:`after_reads`) so that the next layer's loop updates them in place even when routing
does not depend on the hidden state (a declared router); without it the compiler copied the
whole cache at every layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

POLICIES = ("predict", "lru")
EMPTY = -1  # slot_key of an empty slot
TRASH = -2  # slot_key of the trash slot (never matches an expert)
AGE_MAX = (1 << 16) - 1  # recency resolution of a slot's score (steps)
PRIORITY_LEVELS = (1 << 14) - 1  # predicted-use resolution of a slot's score
PROTECTED = jnp.iinfo(jnp.int32).max
PRIOR_DECAY = 0.995  # per step: the population prior follows the last few hundred steps
# Stats columns, per MoE layer, accumulated over steps (ExpertCache.stats).
# PASSES: overflow passes (0 when the layer's experts fit the cache at once); PADDING: copies
# into the trash slot that fill the last chunk of a layer's demand copies (copy_chunk > 1).
NEEDED, HITS, FETCHED, PREFETCHED, WASTED, PASSES, PADDING = range(7)
STAT_NAMES = ("needed", "hits", "fetched", "prefetched", "wasted", "passes", "padding")


@dataclasses.dataclass(frozen=True)
class OffloadSpec:
    """The static shape of an offloaded model (hashable: part of the traced program)."""

    policy: str  # "predict" or "lru"
    num_layers: int  # MoE layers, in the order the forward calls them
    num_experts: int
    top_k: int
    slots: int  # N: device slots shared by all MoE layers
    prefetch: int = 0  # copies a step (predict only)
    rows: int = 1  # history rows: the runner's batch slots (max_num_seqs)
    copy_chunk: int = 1  # demand copies per loop iteration (envs.moe_offload_copy_chunk)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.slots < self.top_k:
            raise ValueError(
                f"a device expert cache of {self.slots} slots cannot hold one token's "
                f"{self.top_k} experts; give TPU_PLUGIN_MOE_OFFLOAD_CACHE at least that many"
            )

    @property
    def keys(self) -> int:
        """Rows of the host stacks: every (layer, expert)."""
        return self.num_layers * self.num_experts

    @property
    def prefetch_groups(self) -> int:
        return min(self.prefetch, self.num_layers) if self.policy == "predict" else 0

    def group_start(self, group: int) -> int:
        """First MoE layer of prefetch group ``group``."""
        return group * self.num_layers // self.prefetch_groups


class HostExperts(NamedTuple):
    """Every MoE layer's routed experts, stacked over layers, in host memory."""

    gate_up: jax.Array  # [L * E, 2I, H]
    down: jax.Array  # [L * E, H, I]


class ExpertCache(NamedTuple):
    """The device expert cache and the policy's state (donated and returned every step)."""

    gate_up: jax.Array  # [N + 1, 2I, H]
    down: jax.Array  # [N + 1, H, I]
    slot_key: jax.Array  # [N + 1] int32: l * E + e held, EMPTY, or TRASH (slot N)
    slot_of: jax.Array  # [L * E] int32: slot holding (l, e), or -1
    last_use: jax.Array  # [N + 1] int32: clock of the slot's last use
    clock: jax.Array  # [] int32: steps so far
    history: jax.Array  # [rows, L, E] float32: per-request routing counts (predict; else [0,..])
    prior: jax.Array  # [L, E] float32: decayed population routing counts
    stats: jax.Array  # [L, len(STAT_NAMES)] int32, accumulated
    tokens: jax.Array  # [] int32: real tokens served, accumulated
    # Per-step inputs, written by the runner before each step (expert_cache.prepare):
    row_slot: jax.Array  # [rows] int32: batch slot of each step row, -1 for padding rows
    row_fresh: jax.Array  # [rows] bool: the row's request is new in its slot


class OffloadedCaches(NamedTuple):
    """What the runner's ``kv_caches`` holds with offload on: the KV pages and the cache."""

    layers: list
    experts: ExpertCache


def map_kv_layers(kv_caches: Any, fn: Callable[[list], list]) -> Any:
    """``fn`` applied to the KV pages, whether or not the expert cache rides with them."""
    if isinstance(kv_caches, OffloadedCaches):
        return kv_caches._replace(layers=fn(kv_caches.layers))
    return fn(kv_caches)


def initial_cache(
    spec: OffloadSpec,
    gate_up: jax.Array,
    down: jax.Array,
    keys: jax.Array,
) -> ExpertCache:
    """A cache whose first slots hold the experts ``keys`` (their rows ``gate_up`` / ``down``,
    ``[len(keys), ...]`` or already the cache's ``[N + 1, ...]``, on the device); the rest of
    the ``N`` slots start empty."""
    n, filled = spec.slots, int(keys.shape[0])
    if filled > n:
        raise ValueError(f"{filled} initial experts for {n} slots")
    pad = ((0, n + 1 - gate_up.shape[0]), (0, 0), (0, 0))
    slot_key = jnp.full((n + 1,), EMPTY, jnp.int32).at[:filled].set(keys).at[n].set(TRASH)
    slot_of = jnp.full((spec.keys,), -1, jnp.int32).at[keys].set(jnp.arange(filled))
    rows = spec.rows if spec.policy == "predict" else 0
    return ExpertCache(
        gate_up=jnp.pad(gate_up, pad),
        down=jnp.pad(down, pad),
        slot_key=slot_key,
        slot_of=slot_of,
        last_use=jnp.zeros((n + 1,), jnp.int32),
        clock=jnp.zeros((), jnp.int32),
        history=jnp.zeros((rows, spec.num_layers, spec.num_experts), jnp.float32),
        prior=jnp.zeros((spec.num_layers, spec.num_experts), jnp.float32),
        stats=jnp.zeros((spec.num_layers, len(STAT_NAMES)), jnp.int32),
        tokens=jnp.zeros((), jnp.int32),
        row_slot=jnp.full((spec.rows,), -1, jnp.int32),
        row_fresh=jnp.zeros((spec.rows,), jnp.bool_),
    )


_TRACE: contextvars.ContextVar[StepTrace | None] = contextvars.ContextVar(
    "tpu_plugin_moe_offload", default=None
)


def active() -> StepTrace | None:
    """The offloaded step being traced, if any (``SparseMoeBlock`` asks)."""
    return _TRACE.get()


@contextlib.contextmanager
def offloaded_step(trace: StepTrace) -> Iterator[StepTrace]:
    """Traces the enclosed model call with its MoE layers served from ``trace``'s cache."""
    token = _TRACE.set(trace)
    try:
        yield trace
    finally:
        _TRACE.reset(token)


def wrap_forward(
    forward: Callable[..., tuple[Any, Any]],
    spec: OffloadSpec,
    device: jax.sharding.Sharding,
    kernel: Callable[[], Callable[..., jax.Array]],
) -> Callable[..., tuple[Any, Any]]:
    """The runner's forward ``(params, kv_caches, step)`` with offload: ``params`` is
    ``(model parameters, HostExperts)``, ``kv_caches`` an :class:`OffloadedCaches`.

    ``device`` is the sharding of device memory the host copies land in; ``kernel`` returns
    the fused-MoE function (``layers.moe.moe_kernel``).
    """

    def offloaded(params: Any, kv_caches: OffloadedCaches, step: Any) -> tuple[Any, Any]:
        state, host = params
        trace = StepTrace(spec, host, kv_caches.experts, step, device, kernel())
        with offloaded_step(trace):
            layers, out = forward(state, kv_caches.layers, step)
        return OffloadedCaches(layers, trace.finish()), out

    return offloaded


def fetch(host: jax.Array, key: jax.Array, device: jax.sharding.Sharding) -> jax.Array:
    """Row ``key`` of a host stack, copied to device memory (``[1, ...]``)."""
    return jax.device_put(lax.dynamic_index_in_dim(host, key, keepdims=True), device)


def after_reads(out: jax.Array, cache: ExpertCache) -> tuple[jax.Array, ExpertCache]:
    """The cache arrays as values that exist only once the kernel that read them (``out``)
    has run: the next layer's copy loop then updates them in place. Without this tie the
    compilers may keep several versions of the cache alive and copy it whole: XLA GPU and CPU
    before every layer's loop under a router that does not read the hidden state (H200: 1.7 ms
    a layer for a 3.6 GB cache, 20.8 ms of a 45 ms 12-layer step;
    ``benchmarks/offload_cache_copies.py``), and the TPU compiler for Qwen3-30B-A3B with an
    8 GiB cache under the model's own router (22.45 GB of temporaries on a 16 GiB v5e: no
    compile; with the tie, 95 MiB)."""
    out, gate_up, down = lax.optimization_barrier((out, cache.gate_up, cache.down))
    return out, cache._replace(gate_up=gate_up, down=down)


class StepTrace:
    """One step's offloaded MoE layers while the forward is traced (see the module doc)."""

    def __init__(
        self,
        spec: OffloadSpec,
        host: HostExperts,
        cache: ExpertCache,
        step: Any,
        device: jax.sharding.Sharding,
        kernel: Callable[..., jax.Array],
    ):
        self.spec, self.host, self.device, self.kernel = spec, host, device, kernel
        num_tokens = step.input_ids.shape[0]
        starts = step.attention.query_start_loc
        self.valid = jnp.arange(num_tokens) < starts[-1]  # padding tokens route nowhere
        rows = jnp.searchsorted(starts[1:], jnp.arange(num_tokens), side="right")
        rows = jnp.clip(rows, 0, cache.row_slot.shape[0] - 1)
        self.token_slot = jnp.where(self.valid, cache.row_slot[rows], -1)  # batch slot
        self.cache = cache._replace(clock=cache.clock + 1)
        self.priority = None
        if spec.policy == "predict":
            self.cache = self.cache._replace(history=self._forget_fresh_rows())
            self.priority = self._predicted_use()
        self.prefetches = self._plan_prefetches()
        self.seen = 0

    # ---- prediction ----------------------------------------------------------------------
    def _forget_fresh_rows(self) -> jax.Array:
        c = self.cache
        fresh = jnp.where(c.row_fresh & (c.row_slot >= 0), c.row_slot, c.history.shape[0])
        return c.history.at[fresh].set(0.0, mode="drop")

    def _predicted_use(self) -> jax.Array:
        """``[L, E]``: expected number of this step's requests routing to each expert.

        Each running request's own counts, smoothed with the population prior (``top_k``
        pseudo-counts), normalised to its routing distribution per layer and summed.
        """
        c, k = self.cache, float(self.spec.top_k)
        real = c.row_slot >= 0
        counts = c.history[jnp.clip(c.row_slot, 0)]  # [rows, L, E]
        prior = c.prior / jnp.maximum(c.prior.sum(-1, keepdims=True), 1e-6)
        share = (counts + k * prior[None]) / (counts.sum(-1, keepdims=True) + k)
        return jnp.sum(jnp.where(real[:, None, None], share, 0.0), axis=0) * k

    def _priority_levels(self) -> jax.Array | None:
        """The predicted use quantised to ``[0, PRIORITY_LEVELS]`` per key (``[L * E]``)."""
        if self.priority is None:
            return None
        top = jnp.maximum(jnp.max(self.priority), 1e-6)
        levels = jnp.floor(self.priority / top * PRIORITY_LEVELS).astype(jnp.int32)
        return levels.reshape(-1)

    def _scores(self, cache: ExpertCache) -> jax.Array:
        """Every slot's eviction score (lowest goes first); the trash slot never goes."""
        age = jnp.minimum(cache.clock - cache.last_use, AGE_MAX)
        score = AGE_MAX - age
        levels = self._priority_levels()
        if levels is not None:
            score = score + levels[jnp.clip(cache.slot_key, 0)] * (AGE_MAX + 1)
        score = jnp.where(cache.slot_key == EMPTY, -1, score)
        return jnp.where(cache.slot_key == TRASH, PROTECTED, score)

    # ---- copies --------------------------------------------------------------------------
    def _install(self, cache: ExpertCache, key: jax.Array, slot: jax.Array) -> ExpertCache:
        """Expert ``key`` copied from host memory into ``slot`` (its old expert forgotten)."""
        gate_up = fetch(self.host.gate_up, key, self.device)
        down = fetch(self.host.down, key, self.device)
        old = cache.slot_key[slot]
        gone = jnp.where(old >= 0, old, self.spec.keys)
        slot_of = cache.slot_of.at[gone].set(-1, mode="drop")
        # The trash slot is never mapped: an expert written there stays "not resident".
        kept = jnp.where(cache.slot_key[slot] == TRASH, self.spec.keys, key)
        return cache._replace(
            gate_up=lax.dynamic_update_index_in_dim(cache.gate_up, gate_up, slot, 0),
            down=lax.dynamic_update_index_in_dim(cache.down, down, slot, 0),
            slot_key=cache.slot_key.at[slot].set(jnp.where(old == TRASH, TRASH, key)),
            slot_of=slot_of.at[kept].set(slot, mode="drop"),
            last_use=cache.last_use.at[slot].set(cache.clock),
        )

    def _plan_prefetches(self) -> list[tuple[jax.Array, jax.Array]]:
        """Per prefetch group: its most wanted non-resident key and that want's level."""
        spec = self.spec
        levels = self._priority_levels()
        if not spec.prefetch_groups or levels is None:
            return []
        resident = self.cache.slot_of >= 0
        wanted = jnp.where(resident, -1, levels).reshape(spec.num_layers, spec.num_experts)
        plans = []
        for group in range(spec.prefetch_groups):
            first = spec.group_start(group)
            last = spec.group_start(group + 1) if group + 1 < spec.prefetch_groups else None
            block = wanted[first:last].reshape(-1)
            best = jnp.argmax(block)
            plans.append((first * spec.num_experts + best.astype(jnp.int32), block[best]))
        return plans

    def _land_prefetch(self, cache: ExpertCache, group: int) -> tuple[ExpertCache, jax.Array]:
        """Writes group ``group``'s copy into the lowest-scoring slot, or into the trash slot
        when that slot's expert is wanted as much (or the expert is resident by now)."""
        key, want = self.prefetches[group]
        scores = self._scores(cache)
        victim = jnp.argmin(scores)
        worth = (want > scores[victim] // (AGE_MAX + 1)) & (cache.slot_of[key] < 0) & (want > 0)
        slot = jnp.where(worth, victim, self.spec.slots)
        return self._install(cache, key, slot), worth

    # ---- one MoE layer -------------------------------------------------------------------
    def experts(
        self, layer: int, x: jax.Array, weights: jax.Array, ids: jax.Array, activation: str
    ) -> jax.Array:
        """The routed experts of MoE layer ``layer`` for routing ``(weights, ids)``."""
        spec = self.spec
        if layer != self.seen:
            raise ValueError(f"MoE layer {layer} traced out of order (expected {self.seen})")
        self.seen += 1
        stats = jnp.zeros((len(STAT_NAMES),), jnp.int32)
        for group in range(1, spec.prefetch_groups):
            if spec.group_start(group) == layer:
                self.cache, worth = self._land_prefetch(self.cache, group)
                landed = worth.astype(jnp.int32)
                stats = stats.at[PREFETCHED].add(landed).at[WASTED].add(1 - landed)
        num_tokens, top_k = ids.shape
        valid = jnp.repeat(self.valid, top_k)
        flat = jnp.where(valid, ids.reshape(-1), spec.num_experts)
        needed = jnp.zeros((spec.num_experts + 1,), jnp.bool_).at[flat].set(True)[:-1]
        most = min(spec.num_experts, num_tokens * top_k)
        if most <= spec.slots:
            out, layer_stats = self._one_pass(layer, x, weights, ids, flat, needed, activation)
        else:  # more distinct experts may be routed than the cache holds
            before = self.cache

            def branch(serve: Callable[[], tuple[jax.Array, jax.Array]]) -> Callable[[], Any]:
                def run() -> tuple[jax.Array, jax.Array, ExpertCache]:
                    self.cache = before  # each branch starts from the same cache
                    out, layer_stats = serve()
                    return out, layer_stats, self.cache

                return run

            out, layer_stats, self.cache = lax.cond(
                jnp.sum(needed) <= spec.slots,
                branch(lambda: self._one_pass(layer, x, weights, ids, flat, needed, activation)),
                branch(lambda: self._passes(layer, x, weights, flat, needed, activation)),
            )
        self._record(layer, flat, stats + layer_stats, num_tokens)
        return out

    def _resident_slots(self, layer: int) -> jax.Array:
        e = self.spec.num_experts
        return self.cache.slot_of[layer * e : (layer + 1) * e]

    def _fetch_missing(
        self, layer: int, needed: jax.Array, most: int
    ) -> tuple[jax.Array, jax.Array]:
        """Copies the ``needed`` experts of ``layer`` that are not resident (at most ``most``)
        into victims, ``copy_chunk`` an iteration (the last chunk's spare copies go to the
        trash slot); returns how many experts were copied and how many spare copies."""
        spec, cache = self.spec, self.cache
        resident = self._resident_slots(layer)
        missing = needed & (resident < 0)
        count = jnp.sum(missing).astype(jnp.int32)
        experts = jnp.nonzero(missing, size=most, fill_value=0)[0].astype(jnp.int32)
        keep = jnp.where(needed & (resident >= 0), resident, spec.slots + 1)
        scores = self._scores(cache).at[keep].set(PROTECTED, mode="drop")
        victims = lax.top_k(-scores, most)[1].astype(jnp.int32)

        chunk = spec.copy_chunk

        def copy(c: jax.Array, cache: ExpertCache) -> ExpertCache:
            for j in range(chunk):
                i = c * chunk + j
                at = jnp.minimum(i, most - 1)
                slot = jnp.where(i < count, victims[at], spec.slots)  # spare: the trash slot
                cache = self._install(cache, layer * spec.num_experts + experts[at], slot)
            return cache

        chunks = (count + chunk - 1) // chunk
        self.cache = lax.fori_loop(0, chunks, copy, cache)
        return count, chunks * chunk - count

    def _call_kernel(self, x, weights, slots, activation: str, top_k: int) -> jax.Array:
        kwargs = {}
        from tpu_kernels.fused_moe import xla

        if self.kernel is xla.fused_moe:
            # The resident path's row tile (picked from the model's expert count), so the
            # tiles hold the same rows and every row's matmuls are the same.
            kwargs["block_m"] = xla.pick_block_m(x.shape[0] * top_k, self.spec.num_experts)
        out = self.kernel(
            x, weights, slots, self.cache.gate_up, self.cache.down, activation=activation, **kwargs
        )
        out, self.cache = after_reads(out, self.cache)
        return out

    def _one_pass(self, layer, x, weights, ids, flat, needed, activation):
        spec = self.spec
        most = min(spec.num_experts, ids.size, spec.slots)
        hits = jnp.sum(needed & (self._resident_slots(layer) >= 0)).astype(jnp.int32)
        fetched, spare = self._fetch_missing(layer, needed, most)
        key_of = layer * spec.num_experts + jnp.minimum(flat, spec.num_experts - 1)
        slots = jnp.where(flat < spec.num_experts, self.cache.slot_of[key_of], -1)
        self._touch(slots)
        out = self._call_kernel(x, weights, slots.reshape(ids.shape), activation, ids.shape[1])
        stats = jnp.zeros((len(STAT_NAMES),), jnp.int32)
        stats = stats.at[NEEDED].set(jnp.sum(needed)).at[HITS].set(hits).at[FETCHED].set(fetched)
        return out, stats.at[PADDING].set(spare)

    def _passes(self, layer, x, weights, flat, needed, activation):
        """Overflow: passes of at most ``N`` experts, per-choice outputs, summed last."""
        from tpu_kernels.fused_moe.xla import combine_choices

        spec = self.spec
        num_tokens, top_k = weights.shape
        rows = jnp.repeat(x, top_k, axis=0)  # one row per (token, choice)
        ones = jnp.ones((rows.shape[0], 1), jnp.float32)
        hits = jnp.sum(needed & (self._resident_slots(layer) >= 0)).astype(jnp.int32)
        most = min(spec.num_experts, spec.slots)
        key_of = layer * spec.num_experts + jnp.minimum(flat, spec.num_experts - 1)

        def one(carry):
            cache, remaining, total, fetched, spare, passes = carry
            self.cache = cache
            resident = self._resident_slots(layer) >= 0
            here = remaining & resident
            room = spec.slots - jnp.sum(here)
            later = remaining & ~resident
            chosen = here | (later & (jnp.cumsum(later) <= room))
            copied, padding = self._fetch_missing(layer, chosen, most)
            fetched, spare = fetched + copied, spare + padding
            take = (flat < spec.num_experts) & chosen[jnp.minimum(flat, spec.num_experts - 1)]
            slots = jnp.where(take, self.cache.slot_of[key_of], -1)
            self._touch(slots)
            part = self._call_kernel(rows, ones, slots[:, None], activation, 1)
            total = total + part.astype(jnp.float32)
            return self.cache, remaining & ~chosen, total, fetched, spare, passes + 1

        zero = jnp.zeros((), jnp.int32)
        init = (self.cache, needed, jnp.zeros(rows.shape, jnp.float32), zero, zero, zero)
        cache, _, total, fetched, spare, passes = lax.while_loop(lambda c: jnp.any(c[1]), one, init)
        self.cache = cache
        out = combine_choices(total, weights, x.dtype)
        stats = jnp.zeros((len(STAT_NAMES),), jnp.int32)
        stats = stats.at[NEEDED].set(jnp.sum(needed)).at[HITS].set(hits).at[FETCHED].set(fetched)
        return out, stats.at[PASSES].set(passes).at[PADDING].set(spare)

    def _touch(self, slots: jax.Array) -> None:
        c = self.cache
        used = jnp.where(slots >= 0, slots, self.spec.slots + 1)
        self.cache = c._replace(last_use=c.last_use.at[used].set(c.clock, mode="drop"))

    def _record(self, layer: int, flat: jax.Array, stats: jax.Array, num_tokens: int) -> None:
        """The layer's counters, and (predict) its routing into the histories and prior."""
        c, spec = self.cache, self.spec
        c = c._replace(stats=c.stats.at[layer].add(stats))
        if spec.policy == "predict":
            e = jnp.minimum(flat, spec.num_experts - 1)
            real = flat < spec.num_experts
            rows = jnp.repeat(self.token_slot, flat.shape[0] // num_tokens)
            row = jnp.where(real & (rows >= 0), rows, c.history.shape[0])
            history = c.history.at[row, layer, e].add(1.0, mode="drop")
            prior = c.prior.at[layer, e].add(jnp.where(real, 1.0, 0.0))
            c = c._replace(history=history, prior=prior)
        self.cache = c

    # ---- end of the step -----------------------------------------------------------------
    def finish(self) -> ExpertCache:
        """The cache after the step: group 0's prefetch landed (for the next step), the
        prior decayed, the token count added."""
        if self.seen != self.spec.num_layers:
            raise ValueError(
                f"the forward called {self.seen} of the {self.spec.num_layers} offloaded MoE layers"
            )
        cache = self.cache
        if self.spec.prefetch_groups:
            cache, worth = self._land_prefetch(cache, 0)
            landed = worth.astype(jnp.int32)
            stats = cache.stats.at[0, PREFETCHED].add(landed).at[0, WASTED].add(1 - landed)
            cache = cache._replace(stats=stats)
        if self.spec.policy == "predict":
            cache = cache._replace(prior=cache.prior * PRIOR_DECAY)
        return cache._replace(tokens=cache.tokens + jnp.sum(self.valid).astype(jnp.int32))


def number_blocks(model: Any) -> int:
    """Numbers the model's ``SparseMoeBlock``s in layer order (``moe_index``); returns how many.

    The offloaded step addresses MoE layer ``i`` as rows ``i * E ..`` of the host stacks.
    """
    from flax import nnx

    from tpu_plugin.layers.moe import SparseMoeBlock

    def order(path: tuple) -> tuple:  # list indices numerically (layer 10 after layer 9)
        return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)

    found = [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, SparseMoeBlock)]
    blocks = [m for _, m in sorted(found, key=lambda item: order(item[0]))]
    for index, block in enumerate(blocks):
        block.moe_index = index
    return len(blocks)


_ROUTER: contextvars.ContextVar[Callable[[int, jax.Array], jax.Array] | None] = (
    contextvars.ContextVar("tpu_plugin_router_override", default=None)
)


def router_override() -> Callable[[int, jax.Array], jax.Array] | None:
    """The router-logits override in force while tracing, if any."""
    return _ROUTER.get()


@contextlib.contextmanager
def overridden_router(fn: Callable[[int, jax.Array], jax.Array]) -> Iterator[None]:
    """Routes numbered MoE blocks by ``fn(moe_index, logits [T, E] float32) -> logits``.

    For benchmarks that declare their routing (random weights route almost uniformly,
    ``benchmarks/bench_moe_offload.py``); the selection itself (top-k, renormalisation) stays
    the model's. Never used while serving.
    """
    token = _ROUTER.set(fn)
    try:
        yield
    finally:
        _ROUTER.reset(token)
