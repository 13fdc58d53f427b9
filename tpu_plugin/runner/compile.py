"""Shapes XLA compiles for, the sampler programs that serve them, and the persistent cache.

Every step is padded up to a bucket so a serving run compiles a handful of programs, not one
per batch shape: tokens round up to powers of two; sequences to the token bucket (capped by
``max_num_seqs``), so a step's sequence bucket is a function of its token bucket and the
(tokens, sequences) pairs form one chain instead of a grid; the page table's width rounds up
to the power of two of the longest sequence's pages, capped by the model's maximum length,
where attention's work grows with it (``layers.attention.page_table_width_bucketed``; the
CPU's does not, and gets the full width). There is no floor above 1: padding a batch-1
decode to 16 tokens made every matmul 16x wider and halved batch-1 throughput on CPU
(measured, benchmarks/NOTES_cpu_offline.md).

:func:`step_buckets` lists every bucket a configuration can produce, so start-up compiles them
all (precompile.py, ``TPU_PLUGIN_PRECOMPILE``) and serving compiles nothing; the executable
cache (executable_cache.py) makes the next start-up load them from disk without tracing them.
"""

from __future__ import annotations

import json
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


def page_bucket(num_pages: int, max_pages: int, page_size: int, bucketed: bool = True) -> int:
    """The page-table width of a step whose longest sequence needs ``num_pages`` pages.

    ``bucketed=False`` (attention whose work follows the real lengths,
    ``layers.attention.page_table_width_bucketed``): always the full width.
    """
    if not bucketed:
        return max_pages
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
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    block_size: int,
    bucket_widths: bool = True,
) -> list[StepBucket]:
    """Every (tokens, seqs, page width) bucket ``prepare_inputs`` can produce, smallest first.

    A step schedules at most ``max_num_batched_tokens`` tokens (a chunked prefill is cut to
    fit; without chunking vLLM raises the budget to ``max_model_len``) and no more than
    ``max_num_seqs x max_model_len``. Decode steps (tokens == seqs) are the bottom of the
    chain. The page width is at least what the longest sequence of a full bucket needs: a
    bucket of T tokens holds more than T/2 real ones, so some sequence has more than
    T/(2 S) tokens in this step alone; widths below that cannot occur. With
    ``bucket_widths=False`` every bucket has the full width (:func:`page_bucket`).
    """
    max_pages = -(-max_model_len // block_size)
    max_tokens = min(max_num_batched_tokens, max_num_seqs * max_model_len)
    if not bucket_widths:
        return [
            StepBucket(tokens, step_seq_bucket(tokens, max_num_seqs), max_pages)
            for tokens in _powers_of_two(token_bucket(max_tokens))
        ]
    widths = [w for w in _powers_of_two(max_pages) if w >= page_bucket(1, max_pages, block_size)]
    buckets = []
    for tokens in _powers_of_two(token_bucket(max_tokens)):
        seqs = step_seq_bucket(tokens, max_num_seqs)
        fewest_real = tokens // 2 + 1 if tokens > 1 else 1
        longest = -(-fewest_real // seqs)
        min_width = page_bucket(-(-longest // block_size), max_pages, block_size)
        buckets += [StepBucket(tokens, seqs, w) for w in widths if w >= min_width]
    return buckets


def logprobs_width(max_logprobs: int, vocab_size: int, requested: int = -1) -> int:
    """The top-k width of a step's logprobs: ``max_logprobs`` unless a request asks for more
    (vLLM's -1 = the whole vocabulary, as is ``max_logprobs`` -1)."""
    if max_logprobs == -1 or requested >= vocab_size:
        return vocab_size
    return min(max(requested, max_logprobs, 1), vocab_size)


def runtime_sampler_flags(platform: str | None = None) -> bool:
    """Whether the sampler decides ``all_greedy`` / ``use_top_k_top_p`` at run time on
    ``platform`` (JAX's platform name; default ``envs.target_platform()``: this process's
    backend, or the TPU the planner compiles for).

    On the CPU a ``lax.cond`` costs nothing and every program costs seconds to compile, so one
    program per logprobs width serves all rows (4x fewer sampler programs). On GPU, XLA reads
    a conditional's predicate on the host, which would stall the asynchronous dispatch of
    every step; TPU and GPU keep one program per flag combination.
    """
    return (platform or envs.target_platform()) == "cpu"


_RUNTIME_FLAGS = ("all_greedy", "use_top_k_top_p")


def program_flags(flags: dict[str, Any], platform: str | None = None) -> dict[str, Any]:
    """The static flags of the sampler program that serves a step with ``flags``."""
    if runtime_sampler_flags(platform):
        return flags | dict.fromkeys(_RUNTIME_FLAGS)
    return flags


def sampler_variants(
    max_logprobs: int, vocab_size: int, logprobs_mode: str, platform: str | None = None
) -> list[dict]:
    """The static flags of ``sampler.sample`` that plain sampling requests can trigger.

    Mirrors ``JaxModelRunner._sampling_inputs`` through :func:`program_flags`: greedy or not,
    top-k/top-p or not (both ``None`` where decided at run time), and logprobs off or at the
    step width (``max_logprobs``; a request asking for all logprobs, -1, makes it the
    vocabulary). Optional processors (penalties, logit bias, bad words, allowed ids,
    min-tokens, min-p, grammars) change the sampler's inputs, not these flags, and compile on
    first use. ``platform``: the one the programs are for (the TPU planner compiles TPU
    programs on a CPU host); default this process's backend.
    """
    width = logprobs_width(max_logprobs, vocab_size)
    # Where flags are decided at run time the rows also say whether logprobs are wanted: one
    # program at the step width serves both (sampler.SamplingInputs.want_logprobs).
    widths = [width] if runtime_sampler_flags(platform) else [0, width]
    variants = [
        program_flags(
            {
                "all_greedy": greedy,
                "use_top_k_top_p": top_k_top_p,
                "num_logprobs": width,
                "logprobs_mode": logprobs_mode,
            },
            platform,
        )
        for greedy in (True, False)
        for top_k_top_p in (False, True)
        for width in widths
    ]
    return list({json.dumps(v, sort_keys=True): v for v in variants}.values())


class StartupProgram(NamedTuple):
    """One program start-up precompiles: precompile.py compiles the list for this process's
    devices, the TPU planner (tools/tpu_aot.py) the same list for a TPU topology."""

    kind: str  # "forward", "sampler" or "record" (async scheduling's token recorder)
    seqs: int  # sequence rows
    bucket: StepBucket | None = None  # a forward's shapes
    flags: dict[str, Any] | None = None  # a sampler's static flags
    lora: bool = False  # a forward's LoRA version (--enable-lora: every bucket has both)

    @property
    def label(self) -> str:
        if self.bucket is not None:
            b = self.bucket
            lora = " lora" if self.lora else ""
            return f"forward tokens={b.tokens} seqs={b.seqs} pages={b.pages}{lora}"
        if self.flags is not None:
            return f"sample seqs={self.seqs} " + " ".join(f"{k}={v}" for k, v in self.flags.items())
        return f"record_tokens seqs={self.seqs}"


def startup_programs(runner: Any, platform: str | None = None) -> list[StartupProgram]:
    """Every program start-up precompiles for ``runner``'s configuration, in order.

    The forward of every :func:`step_buckets` bucket (page widths bucketed as the runner's
    attention wants; with LoRA, ``runner.lora``, each bucket's LoRA version next to it), then
    per sequence bucket, smallest first, every
    :func:`sampler_variants` variant and, under async scheduling, the program that records
    the sampled tokens (a pooling model's runner: the forwards only). ``platform``: the one
    the programs are for (default ``envs.target_platform()``); it decides which sampler flags
    are static.
    """
    buckets = step_buckets(
        runner.scheduler_config.max_num_batched_tokens,
        runner.max_num_seqs,
        runner.max_model_len,
        runner.block_size,
        runner.bucket_page_widths,
    )
    variants = sampler_variants(
        runner.model_config.max_logprobs,
        runner.batch.vocab_size,
        runner.model_config.logprobs_mode,
        platform,
    )
    versions = (False, True) if getattr(runner, "lora", None) is not None else (False,)
    programs = [
        StartupProgram("forward", b.seqs, bucket=b, lora=lora) for b in buckets for lora in versions
    ]
    if getattr(runner, "pooling", None) is not None:  # pooling models sample nothing
        return programs
    for seqs in sorted({b.seqs for b in buckets}):
        programs += [StartupProgram("sampler", seqs, flags=flags) for flags in variants]
        # The config's, not runner.async_scheduling: the planner's runner never loads.
        if runner.scheduler_config.async_scheduling:
            programs.append(StartupProgram("record", seqs))
    return programs


def dummy_sampling_inputs(runner: Any, seqs: int) -> Any:
    """Plain sampling inputs (host arrays) of ``seqs`` padded rows and no request: the
    shapes the sampler programs of that sequence bucket are compiled for."""
    from tpu_plugin.runner.inputs import HostStep

    host = HostStep(
        req_ids=[],
        slots=np.zeros(0, np.int32),
        completes_prompt=np.zeros(0, bool),
        padded_num_seqs=seqs,
    )
    return runner._sampling_inputs(host)[0]


def lower_forward(jitted: Any, params: Any, kv_caches: Any, step: Any) -> Any:
    """Traces and lowers ``jitted`` for ``step``'s shapes (nothing runs, nothing donated)."""
    return jitted.lower(params, kv_caches, step)


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_backend_compiles = [0]  # this process's XLA compilations (cache hits included), once counted


def _count_backend_compile(event: str, duration: float, **_: object) -> None:
    if event == BACKEND_COMPILE_EVENT:
        _backend_compiles[0] += 1


def count_backend_compiles() -> None:
    """Counts this process's XLA compilations from now on (idempotent): what benchmarks read
    through :func:`worker_compile_count` to prove a timed run compiled nothing."""
    if not getattr(count_backend_compiles, "registered", False):
        jax.monitoring.register_event_duration_secs_listener(_count_backend_compile)
        count_backend_compiles.registered = True  # type: ignore[attr-defined]


def worker_compile_count(worker: Any) -> int:
    """XLA compilations in vLLM's worker process since its model runner started
    (``LLM.collective_rpc(worker_compile_count)``). With ``TPU_PLUGIN_PRECOMPILE=0`` every new
    step shape compiles while serving, and vLLM's asynchronous scheduling mixes prefill chunks
    and decode rows differently from run to run: a benchmark's warm-up is only done when a
    repeat of the run compiles nothing."""
    return _backend_compiles[0]


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


def dummy_step(
    bucket: StepBucket,
    num_pages: int,
    page_size: int,
    prev_tokens: Any = None,
    lora: bool = False,
) -> Any:
    """A step of ``bucket``'s shapes and dtypes with no real token (every KV write dropped).

    ``prev_tokens`` (async scheduling) adds the merge fields, every entry a no-op; ``lora``
    the LoRA version's per-token adapter slots, every token -1 (no adapter).
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
        lora_slots=np.full(tokens, -1, np.int32) if lora else None,
    )
    return jax.device_put(step)._replace(**merge)


def step_key(step: Any) -> tuple[int, int, int, int, bool]:
    """The compiled-program key of a step: tokens, seqs, page width, logits rows, and whether
    it carries LoRA adapters (runner/lora.py)."""
    return (
        step.input_ids.shape[0],
        step.attention.kv_lens.shape[0],
        step.attention.page_indices.shape[1],
        step.logits_indices.shape[0],
        step.lora_slots is not None,
    )


# SamplingInputs' fields every step has; the rest are optional processors (None when unused).
_PLAIN_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "seeds", "draws", "want_logprobs")


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


class LazyCompiles:
    """Programs a serving run compiles because start-up did not: counted and logged once each.

    Precompilation covers plain sampling at every bucket; a request with penalties, logit bias,
    bad words, allowed ids, min-tokens, min-p, a grammar, or more logprobs than
    ``max_logprobs`` needs a sampler program of its own (README, "Shapes are bucketed").
    """

    def __init__(self) -> None:
        self.seen: set[tuple] = set()

    def note(self, kind: str, key: tuple) -> None:
        if (kind, key) in self.seen:
            return
        self.seen.add((kind, key))
        logger.info(
            "compiling a %s program start-up did not precompile (%d so far this run): %s",
            kind,
            len(self.seen),
            key,
        )


def run_sampler(
    programs: dict,
    logits: Any,
    inputs: Any,
    flags: dict[str, Any],
    lazy: LazyCompiles | None = None,
) -> Any:
    """``sampler.sample(logits, inputs, **flags)`` through its precompiled program if any."""
    from tpu_plugin.runner.sampler import sample

    flags = program_flags(flags)
    key = sampler_key(logits, inputs, flags)
    program = programs.get(key)
    if program is not None:
        return program(logits, inputs)
    if lazy is not None and programs:  # precompiled (programs exist) but not this one
        used = [name for name, value in inputs._asdict().items() if value is not None]
        processors = tuple(used[len(_PLAIN_SAMPLING_FIELDS) :])
        lazy.note("sampler", (logits.shape, tuple(sorted(flags.items())), processors))
    return sample(logits, inputs, **flags)
