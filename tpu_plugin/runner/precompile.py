"""Start-up precompilation: every step bucket's forward program and every sampler variant,
compiled (or loaded from the executable cache) before the engine serves a request.

The program list comes from compile.py (:func:`compile.step_buckets`,
:func:`compile.sampler_variants`); this module decides how a user lives through it:

* threads: XLA compiles run in :func:`compile_workers` threads while the main thread traces
  the next program (XLA releases the GIL); cached entries load in the same threads;
* progress: a bar whose time estimate comes from the programs finished so far, per kind
  (forward or sampler, compiled or loaded), so it is right from the first program on instead
  of treating a 0.05 s sampler like a 3 s forward;
* interruption: SIGTERM or Ctrl-C ends start-up within about a second whatever XLA is
  compiling. The worker threads are daemons the exit does not wait for; an entry being
  written finishes first (a write is a rename of a whole temporary file, milliseconds), no
  compile finished after the signal is stored, and an engine process exits at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import jax
import numpy as np
from vllm.logger import init_logger

from tpu_plugin.runner.compile import (
    StartupProgram,
    StepBucket,
    dummy_sampling_inputs,
    dummy_step,
    lower_forward,
    sampler_key,
    startup_programs,
    step_key,
)

logger = init_logger(f"vllm.{__name__}")

# Until a sampler program has finished, one is expected to cost this fraction of a forward
# program of the same start-up (SmolLM2 on 2 CPU cores: ~1 s against ~3.5 s compiled).
SAMPLER_COST_PRIOR = 0.3


def compile_workers() -> int:
    """Threads that run XLA compiles while the main thread traces the next program.

    Half the cores, at most 8: one compile mostly uses one core, and the main thread's
    tracing needs one too. A 2-core machine gets 1 (benchmarks/NOTES_startup.md).
    """
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class CompilePool:
    """Daemon threads that run submitted calls; a ``concurrent.futures`` pool would make the
    interpreter wait at exit for a compile nobody wants any more."""

    def __init__(self, workers: int):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(workers):
            threading.Thread(target=self._work, name=f"precompile-{i}", daemon=True).start()
        self._workers = workers

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._tasks.put((future, fn, args))
        return future

    def close(self) -> None:
        """Lets the threads end once the queue is drained (they never block an exit)."""
        for _ in range(self._workers):
            self._tasks.put(None)


class Progress:
    """The precompile bar and its estimate: remaining programs of each kind times the mean
    wall time between completions of that kind so far."""

    def __init__(self, counts: dict[str, int]):
        from tqdm import tqdm

        self.remaining = dict(counts)
        self.seconds: dict[str, list[float]] = {}
        self._last = time.perf_counter()
        self._lock = threading.Lock()
        self.bar = tqdm(
            total=sum(counts.values()),
            desc="precompiling",
            unit="program",
            mininterval=1.0,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} programs [{elapsed}{postfix}]",
        )
        self.bar.set_postfix_str("estimating", refresh=False)

    def done(self, kind: str, source: str) -> None:
        """One program of ``kind`` ("forward" or "sampler") is ready, ``source`` being
        "compiled" or "loaded"."""
        with self._lock:
            now = time.perf_counter()
            self.seconds.setdefault(f"{kind}/{source}", []).append(now - self._last)
            self._last = now
            self.remaining[kind] -= 1
            self.bar.set_postfix_str(f"about {self.estimate(source):.0f} s left", refresh=False)
            self.bar.update()

    def estimate(self, source: str) -> float:
        def mean(kind: str) -> float | None:
            values = self.seconds.get(f"{kind}/{source}")
            return sum(values) / len(values) if values else None

        forward, sampler = mean("forward"), mean("sampler")
        if sampler is None and forward is not None:
            sampler = forward * SAMPLER_COST_PRIOR
        if forward is None and sampler is not None:
            forward = sampler / SAMPLER_COST_PRIOR
        return self.remaining["forward"] * (forward or 0.0) + self.remaining["sampler"] * (
            sampler or 0.0
        )

    def summary(self) -> str:
        """Programs and mean seconds between completions, per kind and source."""
        return ", ".join(
            f"{len(v)} {kind} {sum(v) / len(v):.2f} s each"
            for kind, v in sorted(self.seconds.items())
        )

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM and SIGINT during the block call ``stop``, then whoever handled them before
    (vLLM's engine logs and records the request; Python's SIGINT raises KeyboardInterrupt),
    then end start-up: an engine process (a child of vLLM's) exits at once, a process of
    the user's own raises ``SystemExit``. Only the main thread can own signal handlers;
    elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: Any) -> None:
        stop()
        name = signal.Signals(signum).name
        logger.info("precompilation stopped by %s", name)
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        if multiprocessing.parent_process() is not None:
            os._exit(128 + signum)  # the compile thread would hold up the interpreter's exit
        raise SystemExit(128 + signum)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def precompile(runner: Any) -> float:
    """Compiles the forward pass for every bucket and the sampler for every variant.

    Both are compiled ahead of time (``lower().compile()``: nothing runs, the KV cache is not
    donated) and kept by shape: forward programs in ``runner._compiled``, which
    ``execute_model`` calls directly, sampler programs in ``runner._compiled_samplers``
    (``compile.run_sampler``). Every program goes into the executable cache
    (executable_cache.py), from which the next start-up loads it without tracing. Returns
    the seconds spent.
    """
    from tpu_plugin.runner.executable_cache import ExecutableCache, jax_cache_bypassed

    programs = startup_programs(runner)
    buckets = [p.bucket for p in programs if p.bucket is not None and not p.lora]
    samplers = sum(p.kind == "sampler" for p in programs)
    seq_buckets = sorted({b.seqs for b in buckets})
    workers = compile_workers()
    forward_variants = 2 if runner.lora is not None else 1  # base and LoRA (startup_programs)
    logger.info(
        "precompiling %d forward buckets x %d (tokens %d..%d, %d sequence buckets, page widths "
        "%d..%d) and %d sampler variants x %d sequence buckets; %d compile thread(s)",
        len(buckets),
        forward_variants,
        buckets[0].tokens,
        buckets[-1].tokens,
        len(seq_buckets),
        min(b.pages for b in buckets),
        max(b.pages for b in buckets),
        samplers // len(seq_buckets),
        len(seq_buckets),
        workers,
    )
    start = time.perf_counter()
    cache = runner._executable_cache = ExecutableCache.for_runner(runner)
    runner._compiled_samplers = {}
    num_forward = sum(p.bucket is not None for p in programs)  # LoRA versions included
    progress = Progress({"forward": num_forward, "sampler": samplers})
    pool = CompilePool(workers)
    stopping = threading.Event()

    def stop() -> None:
        stopping.set()
        if cache is not None:
            cache.finish_writes()

    try:
        # Programs the executable cache stores must be real compiles (jax_cache_bypassed).
        with (
            jax_cache_bypassed() if cache is not None else contextlib.nullcontext(),
            stop_on_signals(stop),
        ):
            token_ids = _build_programs(runner, programs, cache, pool, progress, stopping)
        _record_token_programs(runner, token_ids)
    finally:
        pool.close()
        progress.close()
    if cache is not None:
        logger.info(
            "executable cache %s: %d programs loaded, %d compiled and stored",
            cache.directory,
            cache.hits,
            cache.stored,
        )
    seconds = time.perf_counter() - start
    total = progress.bar.total
    logger.info(
        "precompiled %d programs (%d forward, %d sampler) in %.1f s (%s)",
        total,
        num_forward,
        total - num_forward,
        seconds,
        progress.summary(),
    )
    return seconds


def _build_programs(
    runner: Any,
    programs: list[StartupProgram],
    cache: Any,
    pool: CompilePool,
    progress: Progress,
    stopping: threading.Event,
) -> dict[int, jax.Array]:
    """Submits every program of ``programs`` (``compile.startup_programs``), fills the
    runner's program tables, and returns the async token-record inputs (sampled ids per
    sequence bucket; empty when scheduling is sync)."""
    from tpu_plugin.runner.executable_cache import describe
    from tpu_plugin.runner.sampler import sample

    prev_tokens = runner._last_tokens if runner.async_scheduling else None
    # Parameters and KV pages are the same for every bucket: described once.
    shared = describe((runner.params, runner.kv_caches)) if cache is not None else ""
    tracing = threading.Lock()  # one trace at a time: the main thread's, or a failed load's

    def compile_and_store(kind: str, lowered: Any, key: str | None) -> Any:
        compiled = lowered.compile()
        if key is not None and not stopping.is_set():
            cache.store(key, compiled)
        progress.done(kind, "compiled")
        return compiled

    def lower_locked(lower: Any, args: tuple) -> Any:
        with tracing:
            return lower(*args)

    def load_or_compile(kind: str, key: str, args: tuple, lower: Any) -> Any:
        loaded = cache.load(key, args)
        if loaded is None:  # unreadable entry (logged): compile it after all
            return compile_and_store(kind, lower_locked(lower, args), key)
        progress.done(kind, "loaded")
        return loaded

    def program(kind: str, parts: tuple[str, ...], args: tuple, lower: Any) -> Future:
        """Loads the program from the executable cache in a worker (entries load in
        parallel), else lowers it here and compiles it in a worker."""
        name = "forward" if kind == "forward" else "sample"
        key = cache.key(name, *parts) if cache is not None else None
        if key is not None and cache.contains(key):
            return pool.submit(load_or_compile, kind, key, args, lower)
        if cache is not None:
            cache.load(key, args)  # counts the miss
        return pool.submit(compile_and_store, kind, lower_locked(lower, args), key)

    def make_step(bucket: StepBucket, lora: bool = False) -> Any:
        return dummy_step(bucket, runner.num_pages, runner.block_size, prev_tokens, lora)

    forwards = {}
    for item in programs:
        if item.bucket is None:
            continue
        step = make_step(item.bucket, item.lora)
        args = (runner.params, runner.kv_caches, step)
        lower = functools.partial(lower_forward, runner._aot_forward)
        forwards[step_key(step)] = program("forward", (shared, describe(step)), args, lower)
    samplers, token_ids, sampling, last_sampler = {}, {}, {}, {}
    for item in programs:
        if item.bucket is not None:
            continue
        seqs = item.seqs
        if seqs not in sampling:
            # A real forward's logits: the sampler programs are built for exactly its output.
            bucket = next(p.bucket for p in programs if p.bucket is not None and p.seqs == seqs)
            step = make_step(bucket)
            forward = forwards[step_key(step)].result()
            runner.kv_caches, logits = forward(runner.params, runner.kv_caches, step)
            inputs = jax.device_put(dummy_sampling_inputs(runner, seqs))
            described = describe((logits, inputs)) if cache is not None else ""
            sampling[seqs] = (logits, inputs, described)
        logits, inputs, described = sampling[seqs]
        if item.kind == "sampler":
            lower = functools.partial(sample.lower, **item.flags)
            parts = (described, json.dumps(item.flags, sort_keys=True))
            key = sampler_key(logits, inputs, item.flags)
            samplers[key] = last_sampler[seqs] = program("sampler", parts, (logits, inputs), lower)
        elif prev_tokens is not None:  # "record" (async): sampled ids to copy into slots
            token_ids[seqs] = last_sampler[seqs].result()(logits, inputs).token_ids
    for shape, future in forwards.items():
        runner._compiled[shape] = future.result()
    for key, future in samplers.items():
        runner._compiled_samplers[key] = future.result()
    return token_ids


def _record_token_programs(runner: Any, token_ids: dict[int, jax.Array]) -> None:
    """Compiles async scheduling's token-record programs (tiny; from JAX's own cache)."""
    from tpu_plugin.runner.async_output import record_tokens

    for seqs, ids in token_ids.items():
        no_slots = jax.device_put(np.full(seqs, runner.max_num_seqs, np.int32))
        # Twice: the first step's table is the start-up array, later ones its output.
        recorded = record_tokens(runner._last_tokens, no_slots, ids)
        record_tokens(recorded, no_slots, ids).block_until_ready()
