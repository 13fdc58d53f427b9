"""Shapes XLA compiles for, their precompilation at start-up, and the persistent cache.

Every step is padded up to a bucket so a serving run compiles a handful of programs, not one
per batch shape: tokens round up to powers of two; sequences to the token bucket (capped by
``max_num_seqs``), so a step's sequence bucket is a function of its token bucket and the
(tokens, sequences) pairs form one chain instead of a grid; the page table's width rounds up
to the power of two of the longest sequence's pages, capped by the model's maximum length.
There is no floor above 1: padding a batch-1 decode to 16 tokens made every matmul 16x wider and
halved batch-1 throughput on CPU (measured, benchmarks/NOTES_cpu_offline.md).

:func:`step_buckets` lists every bucket a configuration can produce, so start-up compiles them
all (``TPU_PLUGIN_PRECOMPILE``) and serving compiles nothing; the executable cache
(executable_cache.py) makes the next start-up load them from disk without tracing them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from typing import Any, NamedTuple

import jax
import numpy as np
from vllm.logger import init_logger

from tpu_plugin import envs

# Under vLLM's "vllm" logger so the precompile lines show with vLLM's own start-up logs.
logger = init_logger(f"vllm.{__name__}")

MIN_TOKEN_BUCKET = 1
MIN_SEQ_BUCKET = 1


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def token_bucket(num_tokens: int) -> int:
    return max(MIN_TOKEN_BUCKET, next_power_of_two(num_tokens))


def seq_bucket(num_seqs: int, max_num_seqs: int) -> int:
    return min(max(MIN_SEQ_BUCKET, next_power_of_two(num_seqs)), max(max_num_seqs, num_seqs))


def step_seq_bucket(padded_tokens: int, max_num_seqs: int) -> int:
    """The sequence bucket of a step with ``padded_tokens``: one per token bucket.

    A step has at most one sequence per token, so ``min(tokens, max_num_seqs)`` rows always
    suffice. The extra rows of a prefill step cost only logits rows (well under the forward
    pass of that many tokens) and keep the compiled shapes one-dimensional.
    """
    return seq_bucket(min(padded_tokens, max_num_seqs), max_num_seqs)


# Narrowest page table, in tokens: attention over 128 positions instead of 16 costs nothing
# next to the matmuls, and it removes three page-width buckets from every token bucket.
MIN_KV_WIDTH = 128


def page_bucket(num_pages: int, max_pages: int, page_size: int) -> int:
    min_pages = next_power_of_two(-(-MIN_KV_WIDTH // page_size))
    return min(next_power_of_two(max(min_pages, num_pages)), max_pages)


class StepBucket(NamedTuple):
    """The padded shape of one forward step."""

    tokens: int
    seqs: int
    pages: int  # page-table width


def _powers_of_two(up_to: int) -> list[int]:
    values, n = [], 1
    while n < up_to:
        values.append(n)
        n *= 2
    return values + [up_to]


def step_buckets(
    max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int, block_size: int
) -> list[StepBucket]:
    """Every (tokens, seqs, page width) bucket ``prepare_inputs`` can produce, smallest first.

    A step schedules at most ``max_num_batched_tokens`` tokens (a chunked prefill is cut to
    fit; without chunking vLLM raises the budget to ``max_model_len``) and no more than
    ``max_num_seqs x max_model_len``. Decode steps (tokens == seqs) are the bottom of the
    chain. The page width is at least what the longest sequence of a full bucket needs: a
    bucket of T tokens holds more than T/2 real ones, so some sequence has more than
    T/(2 S) tokens in this step alone; widths below that cannot occur.
    """
    max_pages = -(-max_model_len // block_size)
    max_tokens = min(max_num_batched_tokens, max_num_seqs * max_model_len)
    widths = [w for w in _powers_of_two(max_pages) if w >= page_bucket(1, max_pages, block_size)]
    buckets = []
    for tokens in _powers_of_two(token_bucket(max_tokens)):
        seqs = step_seq_bucket(tokens, max_num_seqs)
        fewest_real = tokens // 2 + 1 if tokens > 1 else 1
        longest = -(-fewest_real // seqs)
        min_width = page_bucket(-(-longest // block_size), max_pages, block_size)
        buckets += [StepBucket(tokens, seqs, w) for w in widths if w >= min_width]
    return buckets


def sampler_variants(max_logprobs: int, vocab_size: int, logprobs_mode: str) -> list[dict]:
    """The static flags of ``sampler.sample`` that plain sampling requests can trigger.

    Mirrors ``JaxModelRunner._sampling_inputs``: greedy or not, top-k/top-p or not, and
    logprobs off or at the step width (``max_logprobs``; a request asking for all logprobs,
    -1, makes it the vocabulary). Optional processors (penalties, logit bias, bad words,
    allowed ids, min-tokens, min-p, grammars) change the sampler's inputs, not these flags,
    and compile on first use.
    """
    widths = sorted({0, min(max(max_logprobs, 1), vocab_size)})
    if max_logprobs == -1:
        widths = sorted({0, vocab_size})
    return [
        {
            "all_greedy": greedy,
            "use_top_k_top_p": top_k_top_p,
            "num_logprobs": width,
            "logprobs_mode": logprobs_mode,
        }
        for greedy in (True, False)
        for top_k_top_p in (False, True)
        for width in widths
    ]


def lower_forward(jitted: Any, params: Any, kv_caches: Any, step: Any) -> Any:
    """Traces and lowers ``jitted`` for ``step``'s shapes (nothing runs, nothing donated)."""
    return jitted.lower(params, kv_caches, step)


def enable_persistent_cache() -> None:
    """Points JAX's compilation cache at ``TPU_PLUGIN_COMPILE_CACHE`` (unless "off")."""
    cache_dir = envs.compile_cache_dir()
    if cache_dir is None:
        return
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Cache every program: a step of a small model compiles in well under a second but loading
    # it is still faster, and precompilation makes hundreds of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logger.info("JAX compilation cache: %s", cache_dir)


def dummy_step(bucket: StepBucket, num_pages: int, page_size: int, prev_tokens: Any = None) -> Any:
    """A step of ``bucket``'s shapes and dtypes with no real token (every KV write dropped).

    ``prev_tokens`` (async scheduling) adds the merge fields, every entry a no-op.
    """
    from tpu_plugin.layers.attention import AttentionMetadata
    from tpu_plugin.runner.inputs import StepInputs

    tokens, seqs = bucket.tokens, bucket.seqs
    merge = {}
    if prev_tokens is not None:
        merge = dict(
            prev_tokens=prev_tokens,
            merge_dst=jax.device_put(np.full(seqs, tokens, np.int32)),
            merge_src=jax.device_put(np.zeros(seqs, np.int32)),
        )
    step = StepInputs(
        input_ids=np.zeros(tokens, np.int32),
        positions=np.zeros(tokens, np.int32),
        attention=AttentionMetadata(
            slot_mapping=np.full(tokens, num_pages * page_size, np.int32),
            kv_lens=np.zeros(seqs, np.int32),
            page_indices=np.zeros((seqs, bucket.pages), np.int32),
            query_start_loc=np.zeros(seqs + 1, np.int32),
            num_seqs=np.zeros(1, np.int32),
        ),
        logits_indices=np.zeros(seqs, np.int32),
    )
    return jax.device_put(step)._replace(**merge)


def step_key(step: Any) -> tuple[int, int, int, int]:
    """The compiled-program key of a step: tokens, seqs, page width, logits rows."""
    return (
        step.input_ids.shape[0],
        step.attention.kv_lens.shape[0],
        step.attention.page_indices.shape[1],
        step.logits_indices.shape[0],
    )


def compile_workers() -> int:
    """Threads that run XLA compiles while the main thread traces the next program.

    Half the cores, at most 8: one compile mostly uses one core, and the main thread's
    tracing needs one too. A 2-core machine gets 1 (benchmarks/NOTES_startup.md).
    """
    return max(1, min(8, (os.cpu_count() or 2) // 2))


# SamplingInputs' fields every step has; the rest are optional processors (None when unused).
_PLAIN_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "seeds", "draws")


def sampler_key(logits: Any, inputs: Any, flags: dict[str, Any]) -> tuple | None:
    """The precompiled sampler program for these inputs, None if a processor is in use.

    Optional processors (penalties, bias, grammar, ...) add fields to ``SamplingInputs`` and
    run through ``sampler.sample``'s jit instead, compiled on first use.
    """
    if any(value is not None for value in inputs[len(_PLAIN_SAMPLING_FIELDS) :]):
        return None
    return (
        logits.shape,
        inputs.temperature.shape[0],
        flags["all_greedy"],
        flags["use_top_k_top_p"],
        flags["num_logprobs"],
        flags["logprobs_mode"],
    )


def run_sampler(programs: dict, logits: Any, inputs: Any, flags: dict[str, Any]) -> Any:
    """``sampler.sample(logits, inputs, **flags)`` through its precompiled program if any."""
    from tpu_plugin.runner.sampler import sample

    program = programs.get(sampler_key(logits, inputs, flags))
    if program is not None:
        return program(logits, inputs)
    return sample(logits, inputs, **flags)


def precompile(runner: Any) -> float:
    """Compiles the forward pass for every bucket and the sampler for every variant.

    Both are compiled ahead of time (``lower().compile()``: nothing runs, the KV cache is not
    donated) and kept by shape: forward programs in ``runner._compiled``, which
    ``execute_model`` calls directly, sampler programs in ``runner._compiled_samplers``
    (:func:`run_sampler`). Every program goes into the executable cache
    (executable_cache.py), from which the next start-up loads it without tracing; XLA
    compiles run in :func:`compile_workers` threads while the main thread traces the next
    program. Returns the seconds spent.
    """
    import time
    from concurrent.futures import Future, ThreadPoolExecutor

    from tqdm import tqdm

    from tpu_plugin.runner.async_output import record_tokens
    from tpu_plugin.runner.executable_cache import (
        ExecutableCache,
        describe,
        jax_cache_bypassed,
    )
    from tpu_plugin.runner.inputs import HostStep
    from tpu_plugin.runner.sampler import sample

    sched = runner.scheduler_config
    buckets = step_buckets(
        sched.max_num_batched_tokens, runner.max_num_seqs, runner.max_model_len, runner.block_size
    )
    variants = sampler_variants(
        runner.model_config.max_logprobs,
        runner.batch.vocab_size,
        runner.model_config.logprobs_mode,
    )
    seq_buckets = sorted({b.seqs for b in buckets})
    if getattr(runner, "pooling", None) is not None:  # pooling models sample nothing
        variants, seq_buckets = [], []
    prev_tokens = runner._last_tokens if runner.async_scheduling else None

    def make_step(bucket: StepBucket) -> Any:
        return dummy_step(bucket, runner.num_pages, runner.block_size, prev_tokens)

    workers = compile_workers()
    logger.info(
        "precompiling %d forward buckets (tokens %d..%d, %d sequence buckets, page widths "
        "%d..%d) and %d sampler variants x %d sequence buckets; %d compile thread(s)",
        len(buckets),
        buckets[0].tokens,
        buckets[-1].tokens,
        len(seq_buckets),
        min(b.pages for b in buckets),
        max(b.pages for b in buckets),
        len(variants),
        len(seq_buckets),
        workers,
    )
    start = time.perf_counter()
    cache = runner._executable_cache = ExecutableCache.for_runner(runner)
    # Parameters and KV pages are the same for every bucket: described once.
    shared = describe((runner.params, runner.kv_caches)) if cache is not None else ""
    total = len(buckets) + len(seq_buckets) * len(variants)
    runner._compiled_samplers = {}
    # Programs the executable cache stores must be real compiles (jax_cache_bypassed).
    with (
        jax_cache_bypassed() if cache is not None else contextlib.nullcontext(),
        tqdm(total=total, desc="precompiling", unit="program", mininterval=1.0) as bar,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):

        def compile_and_store(lowered: Any, key: str | None) -> Any:
            compiled = lowered.compile()
            if key is not None:
                cache.store(key, compiled)
            bar.update()
            return compiled

        # One program traces at a time: the main thread, or a worker whose entry failed to load.
        tracing = threading.Lock()

        def lower_locked(lower: Any, args: tuple) -> Any:
            with tracing:
                return lower(*args)

        def load_or_compile(key: str, args: tuple, lower: Any) -> Any:
            loaded = cache.load(key, args)
            if loaded is None:  # unreadable entry (logged): compile it after all
                return compile_and_store(lower_locked(lower, args), key)
            bar.update()
            return loaded

        def program(name: str, parts: tuple[str, ...], args: tuple, lower: Any) -> Future:
            """Loads the program from the executable cache in a worker (entries load in
            parallel), else lowers it here and compiles it in a worker (XLA releases the
            GIL while the main thread traces the next program)."""
            key = cache.key(name, *parts) if cache is not None else None
            if key is not None and cache.contains(key):
                return pool.submit(load_or_compile, key, args, lower)
            if cache is not None:
                cache.load(key, args)  # counts the miss
            return pool.submit(compile_and_store, lower_locked(lower, args), key)

        forwards = {}
        for bucket in buckets:
            step = make_step(bucket)
            args = (runner.params, runner.kv_caches, step)
            lower = functools.partial(lower_forward, runner._aot_forward)
            forwards[step_key(step)] = program("forward", (shared, describe(step)), args, lower)
        samplers, token_ids = {}, {}
        for seqs in seq_buckets:
            # A real forward's logits: the sampler programs are built for exactly its output.
            step = make_step(next(b for b in buckets if b.seqs == seqs))
            forward = forwards[step_key(step)].result()
            runner.kv_caches, logits = forward(runner.params, runner.kv_caches, step)
            host = HostStep(
                req_ids=[],
                slots=np.zeros(0, np.int32),
                completes_prompt=np.zeros(0, bool),
                padded_num_seqs=seqs,
            )
            inputs = jax.device_put(runner._sampling_inputs(host)[0])
            described = describe((logits, inputs)) if cache is not None else ""
            for flags in variants:
                lower = functools.partial(sample.lower, **flags)
                parts = (described, json.dumps(flags, sort_keys=True))
                key = sampler_key(logits, inputs, flags)
                samplers[key] = program("sample", parts, (logits, inputs), lower)
            if prev_tokens is not None:  # async: sampled ids to copy into their slots
                token_ids[seqs] = samplers[key].result()(logits, inputs).token_ids
        for shape, future in forwards.items():
            runner._compiled[shape] = future.result()
        for key, future in samplers.items():
            runner._compiled_samplers[key] = future.result()
    for seqs, ids in token_ids.items():  # tiny jitted programs, from JAX's cache
        no_slots = jax.device_put(np.full(seqs, runner.max_num_seqs, np.int32))
        # Twice: the first step's table is the start-up array, later ones its output.
        recorded = record_tokens(prev_tokens, no_slots, ids)
        record_tokens(recorded, no_slots, ids).block_until_ready()
    if cache is not None:
        logger.info(
            "executable cache %s: %d programs loaded, %d compiled and stored",
            cache.directory,
            cache.hits,
            cache.stored,
        )
    seconds = time.perf_counter() - start
    logger.info(
        "precompiled %d programs (%d forward, %d sampler) in %.1f s",
        total,
        len(buckets),
        total - len(buckets),
        seconds,
    )
    return seconds
