"""Where a decode step's time goes: the device program alone vs the engine's step.

``device_step_profile`` runs inside the engine's worker (``LLM.collective_rpc``) after the
throughput runs, on the very programs the engine precompiled and served. For each batch size it
builds a decode step of that many sequences at ``context`` tokens of KV each (real page tables
over distinct pages; the KV writes go to the dropped slot past the cache) and times:

- ``forward_ms``: the compiled forward pass alone, back to back, one sync at the end: what the
  device needs per step when the host never makes it wait;
- ``forward_sample_ms``: forward plus the greedy sampler, as the engine runs them;
- ``dispatch_ms``: host time to enqueue one forward + sample without waiting (JAX dispatches
  asynchronously): if this approaches ``forward_sample_ms`` the step is host-bound;
- ``bytes_accessed``: XLA's own estimate of the bytes the forward program touches (its cost
  analysis), to compare with the weight + KV bytes the roofline assumes: a program that reads
  a weight twice, or copies one, shows up here.

The suite compares these with the engine's measured step time (batch / decode tok/s): the gap
between the engine and ``forward_sample_ms`` is host-side (scheduler, input preparation, output
processing) time the device spent idle.

``op_profile`` then traces a few forward steps with JAX's profiler and sums the device's kernel
events by name (``jax.profiler.ProfileData``, no TensorBoard needed): kernel time per step,
idle time between kernels, and the kernels that take the most time. It also reads the very
program's optimized HLO (``Compiled.as_text()``, what ``--xla_dump_to`` writes as
``after_optimizations``) and joins it with the trace (``tpu_plugin.tools.hlo_inventory``):
every kernel of the step named by its role and the plugin functions its ops come from
(``named``), the text written to ``<out_dir>/decode_b<batch>.hlo.txt``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def _decode_step(runner: Any, batch: int, context: int) -> Any:
    """A decode step of ``batch`` sequences with ``context`` tokens each, on distinct pages."""
    import jax

    from tpu_plugin.runner.compile import StepBucket, dummy_step, page_bucket

    block = runner.block_size
    max_pages = -(-runner.max_model_len // block)
    width = page_bucket(-(-context // block), max_pages, block)
    prev = runner._last_tokens if runner.async_scheduling else None
    step = dummy_step(StepBucket(batch, batch, width), runner.num_pages, block, prev)
    pages = (np.arange(batch * width, dtype=np.int32) % runner.num_pages).reshape(batch, width)
    attention = step.attention._replace(
        kv_lens=jax.device_put(np.full(batch, context, np.int32)),
        page_indices=jax.device_put(pages),
        query_start_loc=jax.device_put(np.arange(batch + 1, dtype=np.int32)),
        num_seqs=jax.device_put(np.array([batch], np.int32)),
    )
    positions = jax.device_put(np.full(batch, context - 1, np.int32))
    return step._replace(attention=attention, positions=positions)


def _bytes_accessed(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend or program reports one
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    value = (cost or {}).get("bytes accessed")
    return float(value) if value is not None else None


def device_step_profile(worker: Any, batches: list[int], context: int, steps: int = 30) -> dict:
    """Per batch size: forward-only, forward+sample and dispatch times (ms) and XLA bytes."""
    import jax

    from tpu_plugin.runner.compile import step_key
    from tpu_plugin.runner.inputs import HostStep
    from tpu_plugin.runner.sampler import sample

    runner = worker.model_runner
    results: dict[str, Any] = {}
    for batch in batches:
        step = _decode_step(runner, batch, context)
        compiled = runner._compiled.get(step_key(step))
        forward = compiled or runner._forward
        host = HostStep(
            req_ids=[],
            slots=np.zeros(0, np.int32),
            completes_prompt=np.zeros(0, bool),
            padded_num_seqs=batch,
        )
        inputs, flags = runner._sampling_inputs(host)
        flags.update(all_greedy=True, use_top_k_top_p=False, num_logprobs=0)
        inputs = jax.device_put(inputs)

        kv = runner.kv_caches
        for _ in range(3):  # warm: first calls may still compile the sampler
            kv, logits = forward(runner.params, kv, step)
            jax.block_until_ready(sample(logits, inputs, **flags))

        start = time.perf_counter()
        for _ in range(steps):
            kv, logits = forward(runner.params, kv, step)
        jax.block_until_ready(logits)
        forward_ms = (time.perf_counter() - start) / steps * 1e3

        start = time.perf_counter()
        dispatch = 0.0
        for _ in range(steps):
            enqueue = time.perf_counter()
            kv, logits = forward(runner.params, kv, step)
            sampled = sample(logits, inputs, **flags)
            dispatch += time.perf_counter() - enqueue
        jax.block_until_ready(sampled)
        forward_sample_ms = (time.perf_counter() - start) / steps * 1e3
        runner.kv_caches = kv
        results[str(batch)] = {
            "precompiled": compiled is not None,
            "forward_ms": forward_ms,
            "forward_sample_ms": forward_sample_ms,
            "dispatch_ms": dispatch / steps * 1e3,
            "bytes_accessed": _bytes_accessed(compiled) if compiled is not None else None,
        }
    return results


def _device_kernel_events(path: str) -> list[tuple[str, float, float]]:
    """(name, start ns, duration ns) of every kernel event on the accelerator's planes."""
    from jax.profiler import ProfileData

    events = []
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            # Kernel timelines are the "Stream" lines; the others summarise (XLA Modules/Ops).
            if "stream" not in line.name.lower():
                continue
            events += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
    return events


def _program_text(runner: Any, compiled: Any, step: Any) -> str | None:
    """The optimized HLO of the program that runs ``step`` (compiled here if it was not)."""
    try:
        if compiled is None:
            compiled = runner._forward.lower(runner.params, runner.kv_caches, step).compile()
        return compiled.as_text()
    except Exception:  # a deserialized executable may carry no text
        return None


def op_profile(
    worker: Any,
    batch: int,
    context: int,
    steps: int = 10,
    top: int = 15,
    out_dir: str | None = None,
) -> dict:
    """Kernel time by name for ``steps`` forward passes of a ``batch`` decode step, and every
    kernel of the program named (module doc)."""
    import glob
    import os
    import tempfile

    import jax

    from tpu_plugin.runner.compile import step_key
    from tpu_plugin.tools import hlo_inventory, hlo_trace

    runner = worker.model_runner
    step = _decode_step(runner, batch, context)
    compiled = runner._compiled.get(step_key(step))
    forward = compiled or runner._forward
    text = _program_text(runner, compiled, step)
    kv = runner.kv_caches
    kv, logits = forward(runner.params, kv, step)
    jax.block_until_ready(logits)
    trace_dir = tempfile.mkdtemp(prefix="step-trace-")
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            kv, logits = forward(runner.params, kv, step)
        jax.block_until_ready(logits)
    runner.kv_caches = kv
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        return {"error": "the profiler wrote no trace"}
    named = None
    if text is not None:
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, f"decode_b{batch}.hlo.txt"), "w") as f:
                f.write(text)
        kernels = hlo_inventory.inventory(text)
        named = {
            "summary": hlo_inventory.summary(kernels, runner.num_layers),
            **hlo_trace.join_trace(kernels, hlo_trace.trace_events(files[0]), steps),
        }
    events = _device_kernel_events(files[0])
    if not events:  # JAX CPU (the suite's dry run): the host runtime's kernels are named
        return {"error": "no device kernel events (CUPTI unavailable, or CPU)", "named": named}
    by_name: dict[str, list[float]] = {}
    for name, _, duration in events:
        by_name.setdefault(name, []).append(duration)
    first = min(start for _, start, _ in events)
    last = max(start + duration for _, start, duration in events)
    busy_ns = sum(duration for _, _, duration in events)
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "named": named,
        "batch": batch,
        "kernels_per_step": len(events) / steps,
        "kernel_ms_per_step": busy_ns / steps / 1e6,
        "span_ms_per_step": (last - first) / steps / 1e6,
        "top": [
            {
                "name": name[:120],
                "ms_per_step": sum(durations) / steps / 1e6,
                "calls_per_step": len(durations) / steps,
            }
            for name, durations in ranked
        ],
    }
