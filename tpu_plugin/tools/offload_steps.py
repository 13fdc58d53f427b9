"""A MoE model's steps driven by hand, resident or with its experts offloaded to host memory.

The offload tests (``tests/models/test_moe_offload.py``) and the benchmark
(``benchmarks/bench_moe_offload.py``) need the same thing: load a checkpoint (the routed
experts into host memory when offloaded, :mod:`tpu_plugin.runner.expert_cache`), optionally
route by a declared skew (:mod:`tpu_plugin.tools.skewed_routing`), run one ragged prefill and
greedy decode steps through the runner's step contract, and read the expert cache's counters.
Kept here once so the benchmark times exactly what the tests prove equal to the resident model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PAGE = 16


@dataclasses.dataclass
class StepsResult:
    """What :func:`run_steps` measured."""

    logits: list[np.ndarray]  # per step, ``[sequences, vocab]``
    counters: dict[str, float] | None  # expert_cache.describe_counters (offload only)
    decode_s: list[float]  # wall time of each decode step (after the prefill)
    # The counters of the decode steps after the first (whose time includes its compile).
    steady: dict[str, float] | None = None
    bandwidth: float = 0.0  # host-to-device bytes/s measured at start-up (offload only)
    expert_bytes: int = 0


def empty_caches(cfg: Any, num_pages: int, dtype: Any) -> list:
    """Zeroed KV pages in the model's own layout (K/V pairs, or MLA's latent array)."""
    from tpu_plugin.runner.kv_cache import cache_layout

    heads, width, latent = cache_layout(cfg)
    shape = (num_pages, PAGE, heads, width)
    if latent:
        return [jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)]
    return [
        (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_hidden_layers)
    ]


class Stepper:
    """A loaded model and its jitted step, resident or offloaded (:func:`load`)."""

    def __init__(
        self, cfg: Any, graphdef: Any, params: Any, offload: Any, dtype: Any, pages: int, seed: int
    ):
        self.cfg, self.graphdef, self.params, self.offload = cfg, graphdef, params, offload
        self.dtype, self.pages_per_seq, self.routing_seed = dtype, pages, seed
        self.jitted = step_program(graphdef, offload, seed)

    def with_policy(self, policy: str, copy_chunk: int | None = None) -> Stepper:
        """The same loaded model and host experts under another offload policy
        (``ExpertOffload.variant``), with its own program and cache."""
        return Stepper(
            self.cfg,
            self.graphdef,
            self.params,
            self.offload.variant(policy, copy_chunk),
            self.dtype,
            self.pages_per_seq,
            self.routing_seed,
        )

    def run(
        self, prompts: list[list[int]], steps: int, affinity: jax.Array | None = None
    ) -> StepsResult:
        """A ragged prefill of ``prompts`` and ``steps - 1`` greedy decode steps, from empty
        KV pages and (offload) a fresh expert cache (``ExpertOffload.fresh_cache``)."""
        from tpu_plugin.runner import expert_cache
        from tpu_plugin.runner.inputs import HostStep
        from tpu_plugin.tools.direct_steps import ragged_step

        off = self.offload
        num_pages = len(prompts) * self.pages_per_seq
        kv: Any = empty_caches(self.cfg, num_pages, self.dtype)
        if off is not None:
            off.cache = None  # the last run's cache goes before the new one is built
            off.cache = off.fresh_cache()
            kv = off.attach(kv)
        host_step = HostStep(
            req_ids=[f"r{i}" for i in range(len(prompts))],
            slots=np.arange(len(prompts), dtype=np.int32),
            completes_prompt=np.ones(len(prompts), bool),
            padded_num_seqs=len(prompts),
        )
        starts, new = [0] * len(prompts), [list(p) for p in prompts]
        out: list[np.ndarray] = []
        decode_s: list[float] = []
        mark = None
        for i in range(steps):
            if i == 2 and off is not None:
                mark = expert_cache.counters(kv.experts)
            begin = time.perf_counter()
            if off is not None:
                kv = off.prepare(kv, host_step)
            step = ragged_step(new, starts, self.pages_per_seq, num_pages)
            kv, logits = self.jitted(self.params, kv, step, affinity)
            out.append(np.asarray(logits))  # the next tokens: the step has finished
            if i:
                decode_s.append(time.perf_counter() - begin)
            starts = [s + len(n) for s, n in zip(starts, new, strict=True)]
            new = [[int(t)] for t in out[-1].argmax(-1)]
        if off is None:
            return StepsResult(out, None, decode_s)
        now = expert_cache.counters(kv.experts)
        counts = expert_cache.describe_counters(now, None, off.expert_bytes, off.bandwidth)
        steady = None
        if mark is not None:
            steady = expert_cache.describe_counters(now, mark, off.expert_bytes, off.bandwidth)
        return StepsResult(out, counts, decode_s, steady, off.bandwidth, off.expert_bytes)


def load(
    model_dir: str,
    rows: int,
    offload: tuple[str, tuple[str, float], int] | None = None,
    dtype: Any = jnp.float32,
    pages_per_seq: int = 8,
    routing_seed: int = 3,
) -> Stepper:
    """The checkpoint's model and its step for up to ``rows`` sequences.

    ``offload``: ``(policy, cache setting, prefetch)`` (``envs.moe_offload_cache``'s form) or
    None (resident). The step's last argument, ``affinity`` (``[requests, MoE layers,
    experts]`` log-probabilities, ``skewed_routing.zipf_affinity``, or None for the model's
    own router), is a jit argument, so runs at several skews share one compiled program.
    """
    from flax import nnx
    from transformers import AutoConfig

    from tpu_plugin.layers import moe_offload
    from tpu_plugin.models.loader import load_model
    from tpu_plugin.parallel.mesh import build_mesh, layout_from
    from tpu_plugin.parallel.sharding import ShardingPlan
    from tpu_plugin.runner import expert_cache

    cfg = AutoConfig.from_pretrained(model_dir)
    host = expert_cache.is_routed_expert if offload else None
    model = load_model(str(model_dir), cfg, dtype, host=host)
    moe_offload.number_blocks(model)
    off = host_experts = None
    if offload:
        plan = ShardingPlan(build_mesh(1, jax.devices()), layout_from(cfg, 1, False))
        policy, cache, prefetch = offload
        off = expert_cache.ExpertOffload(policy, rows, plan, cache, prefetch)
        host_experts = off.take_experts(model)
    graphdef, params = nnx.split(model)
    if off is not None:
        params = (params, host_experts)
    return Stepper(cfg, graphdef, params, off, dtype, pages_per_seq, routing_seed)


def step_program(graphdef: Any, off: Any, routing_seed: int) -> Any:
    """The jitted step of :class:`Stepper`: forward and logits, through the expert cache
    when ``off`` (an ``ExpertOffload``) is given, routed by ``affinity`` when that is not
    None."""
    from flax import nnx

    from tpu_plugin.layers import moe_offload
    from tpu_plugin.tools import skewed_routing

    def forward(params: Any, kv_caches: list, step: Any, affinity: Any) -> tuple[list, Any]:
        def plain(params: Any, kv_caches: list, step: Any) -> tuple[list, Any]:
            model = nnx.merge(graphdef, params)
            kv_caches, hidden = model(kv_caches, step.input_ids, step.positions, step.attention)
            return kv_caches, model.compute_logits(hidden[step.logits_indices])

        fn = plain if off is None else off.wrap(plain)
        if affinity is None:
            return fn(params, kv_caches, step)
        tokens = jnp.arange(step.input_ids.shape[0])
        rows = jnp.searchsorted(step.attention.query_start_loc[1:], tokens, "right")
        route = skewed_routing.router(affinity, rows, step.positions, routing_seed)
        with moe_offload.overridden_router(route):
            return fn(params, kv_caches, step)

    return jax.jit(forward, donate_argnums=(1,))


def run_steps(
    model_dir: str,
    prompts: list[list[int]],
    steps: int,
    offload: tuple[str, tuple[str, float], int] | None = None,
    affinity: jax.Array | None = None,
) -> StepsResult:
    """:func:`load` and one :meth:`Stepper.run` (float32, one history row per prompt)."""
    return load(model_dir, len(prompts), offload).run(prompts, steps, affinity)
