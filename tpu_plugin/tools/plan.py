"""Will it fit? Compiles the engine's programs for a TPU topology and says what fits, how fast.

    python -m tpu_plugin.tools.plan --model examples/plan_configs/llama-3-8b.json \\
        --topology v6e:1x1 --max-model-len 2048 --max-num-seqs 128

No TPU and no weights are needed: the model is its Hugging Face config (a checkpoint
directory or a config JSON file), the TPU a topology name (``v5e:1x1``, ``v6e:2x4``,
``v5p:2x2x1``, ``TPU7x:2x2x1``). The engine arguments are vLLM's, with vLLM's defaults.
:mod:`tpu_plugin.tools.tpu_aot` builds the engine's own runner with abstract parameters and KV
pages on the topology's devices and compiles every program start-up would precompile with
the TPU compiler in libtpu (Pallas kernels in Mosaic). The report:

- every program: compiled (seconds, temporaries, peak bytes per device) or the compiler's
  error;
- per-device HBM: weights, KV pages (as many as vLLM's own KV planner gives the budget the
  worker computes: ``--gpu-memory-utilization`` x HBM - weights) and the largest program's
  temporaries, against the chip's capacity; how many KV tokens that is;
- decode step time and tokens/s at batch 1 / 32 / 128, two ways (:class:`Estimate`): a
  roofline of the compiled decode programs (forward at the context's page width, then the
  sampler): the larger of bytes accessed / HBM bandwidth and FLOPs / peak bf16 FLOP/s, from
  XLA's cost analysis (the attention kernel's own cost estimate adds the pages it reads; a
  copy of the pages that XLA makes shows up as bytes moved); and the hand roofline, weights
  plus KV pages read once over the bandwidth. Collectives and kernel inefficiency are in
  neither: estimates, not measurements.

Chip figures and their sources: :mod:`tpu_plugin.tools.tpu_specs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

GIB = 1024**3
BATCHES = (1, 32, 128)
DEFAULT_CONTEXT = 1024


@dataclasses.dataclass
class Estimate:
    """Decode at ``batch`` sequences of ``context`` tokens each, two ways.

    ``seconds``: the compiled decode programs' cost analysis (forward and sampler), the larger
    of bytes accessed / HBM bandwidth and FLOPs / peak. XLA sums the operand and result bytes
    of every op, on-chip copies included (weights prefetched into VMEM are counted when
    copied and again when read), so this is an upper bound on the traffic. ``hand_seconds``:
    the weights plus the KV pages the batch reads, once each, over the HBM bandwidth: the
    floor every decode step pays. Neither counts collectives or kernel inefficiency.
    """

    batch: int
    seconds: float
    bound: str  # "HBM" or "compute"
    kv_fits: bool
    bytes_moved: float = 0.0  # per device, forward and sampler, as XLA counts them
    hand_bytes: float = 0.0  # per device: weights + batch x context x KV bytes per token

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.seconds

    def hand_seconds(self, spec: Any) -> float:
        return self.hand_bytes / spec.hbm_bytes_per_s

    def hand_tokens_per_s(self, spec: Any) -> float:
        return self.batch / self.hand_seconds(spec)


@dataclasses.dataclass
class PlanResult:
    """Everything the report prints (also what the tests check)."""

    options: Any
    topology: str
    devices: int
    device_kind: str
    spec: Any  # tpu_specs.DeviceSpec
    architecture: str
    parameters: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    async_scheduling: bool
    weight_bytes: int
    kv_bytes: int
    kv_blocks: int
    kv_tokens: int
    kv_note: str | None
    compiled: list[Any]
    total_programs: int
    seconds: float
    context: int
    estimates: list[Estimate]
    host_bytes: int = 0  # MoE offload's routed experts, in host memory

    @property
    def failed(self) -> list[Any]:
        return [c for c in self.compiled if c.error is not None]

    @property
    def largest_temp(self) -> Any:
        ok = [c for c in self.compiled if c.error is None]
        return max(ok, key=lambda c: c.temp_bytes) if ok else None

    @property
    def peak_bytes(self) -> int:
        return max((c.peak_bytes for c in self.compiled if c.error is None), default=0)

    @property
    def fits(self) -> bool:
        return self.kv_note is None and self.peak_bytes <= self.spec.hbm_bytes


def _decode_bucket(runner: Any, batch: int, context: int) -> Any:
    """The forward bucket of ``batch`` decodes whose sequences hold ``context`` tokens."""
    from tpu_plugin.runner import compile as buckets_of

    max_pages = -(-runner.max_model_len // runner.block_size)
    pages = buckets_of.page_bucket(-(-context // runner.block_size), max_pages, runner.block_size)
    return buckets_of.StepBucket(
        batch, buckets_of.step_seq_bucket(batch, runner.max_num_seqs), pages
    )


def _wanted(
    programs: list[Any], subset: str, runner: Any, context: int, batches: Sequence[int]
) -> list[Any]:
    """All programs, or (``estimate``) the ones the memory peak and the estimates need."""
    if subset == "all":
        return programs
    decodes = {_decode_bucket(runner, b, context) for b in batches if b <= runner.max_num_seqs}
    forwards = [p for p in programs if p.kind == "forward"]
    largest = max(forwards, key=lambda p: (p.bucket.tokens, p.bucket.pages))
    keep = {id(largest)} | {id(p) for p in forwards if p.bucket in decodes}
    seqs = {p.seqs for p in forwards if id(p) in keep}
    first_sampler = {}
    for p in programs:
        if p.kind == "sampler" and p.seqs in seqs:
            first_sampler.setdefault(p.seqs, p)
    keep |= {id(p) for p in first_sampler.values()}
    return [p for p in programs if id(p) in keep]


def _roofline(compiled: Any, spec: Any) -> tuple[float, str]:
    """Seconds of one program on one device: bytes over bandwidth or FLOPs over peak."""
    memory = compiled.bytes_accessed / spec.hbm_bytes_per_s
    compute = compiled.flops / spec.bf16_flops_per_s
    return max(memory, compute), "HBM" if memory >= compute else "compute"


def estimates(
    result_compiled: list[Any],
    runner: Any,
    spec: Any,
    weight_bytes: int,
    kv_bytes_per_token: float,
    kv_tokens: int,
    context: int,
    batches: Sequence[int],
) -> list[Estimate]:
    """Decode step estimates at ``batches`` from the compiled decode programs (:class:`Estimate`);
    ``kv_bytes_per_token``: one device's KV bytes per cached token, all layers."""
    out = []
    for batch in batches:
        if batch > runner.max_num_seqs:
            continue
        bucket = _decode_bucket(runner, batch, context)
        forward = next(
            (c for c in result_compiled if c.error is None and c.program.bucket == bucket), None
        )
        sampler = next(
            (
                c
                for c in result_compiled
                if c.error is None and c.program.kind == "sampler" and c.program.seqs == bucket.seqs
            ),
            None,
        )
        if forward is None:
            continue
        seconds, bound = _roofline(forward, spec)
        moved = forward.bytes_accessed
        if sampler is not None:
            seconds += _roofline(sampler, spec)[0]
            moved += sampler.bytes_accessed
        hand = weight_bytes + batch * context * kv_bytes_per_token
        out.append(Estimate(batch, seconds, bound, batch * context <= kv_tokens, moved, hand))
    return out


def plan(
    options: Any,
    topology: str,
    *,
    subset: str = "all",
    context: int = DEFAULT_CONTEXT,
    batches: Sequence[int] = BATCHES,
    progress: Any = None,
) -> PlanResult:
    """Compiles ``options``' engine for ``topology`` and measures what fits (module doc)."""
    from tpu_plugin.tools import tpu_aot, tpu_specs
    from tpu_plugin.worker import page_budget

    start = time.perf_counter()
    devices = tpu_aot.topology_devices(topology)
    tp, dp = options.tensor_parallel_size, options.data_parallel_size
    if tp * dp > len(devices):
        raise ValueError(
            f"--tensor-parallel-size {tp} x --data-parallel-size {dp} needs {tp * dp} devices; "
            f"{topology} has {len(devices)}"
        )
    spec = tpu_specs.device_spec(devices[0])
    with tpu_aot.tpu_kernels():
        vllm_config = tpu_aot.engine_config(options)
        engine = tpu_aot.AbstractEngine(vllm_config, devices[:tp])  # rank 0; others alike
        runner = engine.runner
        weights = engine.weight_bytes
        free = int(spec.hbm_bytes * vllm_config.cache_config.gpu_memory_utilization) - weights
        one_sequence = -(-runner.max_model_len // runner.block_size) + 1
        kv_note = None
        if free <= 0:
            kv_note = (
                f"the weights ({weights / GIB:.2f} GiB per device) leave nothing of "
                f"{vllm_config.cache_config.gpu_memory_utilization} x "
                f"{spec.hbm_bytes / GIB:.1f} GiB for KV pages"
            )
            blocks = one_sequence
        else:
            try:
                blocks = engine.kv_blocks_for(page_budget(free, engine.kv_shards(), "tpu"))
            except ValueError as error:  # vLLM's own: one max_model_len sequence does not fit
                kv_note = str(error).splitlines()[0]
                blocks = one_sequence
        engine.set_kv(blocks)
        programs = engine.programs()
        chosen = _wanted(programs, subset, runner, min(context, runner.max_model_len), batches)
        compiled = []
        for i, program in enumerate(chosen):
            done = tpu_aot.compile_program(program)
            compiled.append(done)
            if progress is not None:
                status = "ok" if done.error is None else f"FAILED: {done.error}"
                print(
                    f"[{i + 1}/{len(chosen)}] {program.label}: {done.seconds:.1f} s {status}",
                    file=progress,
                    flush=True,
                )
    context = min(context, runner.max_model_len)
    kv_tokens = 0 if kv_note else (blocks - 1) * runner.block_size  # vLLM keeps a null block
    kv_bytes = engine.kv_bytes
    parameters = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(engine.params))
    return PlanResult(
        options=options,
        topology=topology,
        devices=len(devices),
        device_kind=devices[0].device_kind,
        spec=spec,
        architecture=list(runner.model_config.architectures or ["?"])[0],
        parameters=parameters,
        max_model_len=runner.max_model_len,
        max_num_seqs=runner.max_num_seqs,
        max_num_batched_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
        block_size=runner.block_size,
        async_scheduling=bool(vllm_config.scheduler_config.async_scheduling),
        weight_bytes=weights,
        kv_bytes=kv_bytes,
        kv_blocks=blocks,
        kv_tokens=kv_tokens,
        kv_note=kv_note,
        compiled=compiled,
        total_programs=len(programs),
        seconds=time.perf_counter() - start,
        context=context,
        # A pooling model (--runner pooling) runs prefill steps only: no decode to estimate.
        estimates=[]
        if getattr(runner, "pooling", None) is not None
        else estimates(
            compiled,
            runner,
            spec,
            weights,
            kv_bytes / (blocks * runner.block_size),
            kv_tokens,
            context,
            batches,
        ),
        host_bytes=engine.host_bytes,
    )


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_report(result: PlanResult, *, programs: bool = True) -> str:
    """The planner's tables as Markdown."""
    o, spec = result.options, result.spec
    engines = o.data_parallel_size
    lines = [
        f"## {os.path.basename(o.model.rstrip('/'))} on {result.topology}",
        "",
        f"{result.architecture}, {result.parameters / 1e9:.2f} B parameters; "
        f"{o.tensor_parallel_size} x {result.device_kind} per engine"
        + (f", {engines} engines (data parallel)" if engines > 1 else "")
        + (", expert parallel" if o.enable_expert_parallel else "")
        + f"; max_model_len {result.max_model_len}, max_num_seqs {result.max_num_seqs}, "
        f"max_num_batched_tokens {result.max_num_batched_tokens}, {o.dtype}, "
        f"block {result.block_size}, async scheduling "
        f"{'on' if result.async_scheduling else 'off'}.",
        f"Device: {_gib(spec.hbm_bytes)} HBM, {spec.hbm_bytes_per_s / 1e9:.0f} GB/s, "
        f"{spec.bf16_flops_per_s / 1e12:.0f} TFLOP/s bf16 ({spec.chip.source}"
        + (
            f"; one of {spec.devices_per_chip} devices per chip"
            if spec.devices_per_chip > 1
            else ""
        )
        + ").",
        "",
    ]
    ok = len(result.compiled) - len(result.failed)
    lines.append(
        f"Programs: {ok} of {len(result.compiled)} compiled"
        + (
            f" ({len(result.compiled)} of the {result.total_programs} start-up precompiles)"
            if len(result.compiled) != result.total_programs
            else " (every program start-up precompiles)"
        )
        + f"; planner wall time {result.seconds:.0f} s."
    )
    if programs:
        lines += [
            "",
            "| program | compile s | temporaries MiB | peak GiB | result |",
            "|---|---|---|---|---|",
        ]
        for c in result.compiled:
            if c.error is None:
                lines.append(
                    f"| {c.program.label} | {c.seconds:.1f} | {c.temp_bytes / 2**20:.1f} | "
                    f"{c.peak_bytes / GIB:.2f} | compiles |"
                )
            else:
                lines.append(f"| {c.program.label} | {c.seconds:.1f} | | | {c.error} |")
    largest = result.largest_temp
    lines += [
        "",
        f"| per device | of {_gib(spec.hbm_bytes)} |",
        "|---|---|",
        f"| weights | {_gib(result.weight_bytes)}"
        + (" (with MoE offload's device expert cache)" if result.host_bytes else "")
        + " |",
        f"| KV pages | {_gib(result.kv_bytes)}: {result.kv_blocks} pages x {result.block_size} "
        f"tokens = {result.kv_tokens:,} KV tokens |",
    ]
    if result.host_bytes:
        lines.append(f"| routed experts in host memory (MoE offload) | {_gib(result.host_bytes)} |")
    if largest is not None:
        temp = f"{largest.temp_bytes / 2**20:.0f} MiB"
        lines.append(f"| largest temporaries | {temp} ({largest.program.label}) |")
    lines.append(
        f"| peak of any program | {_gib(result.peak_bytes)}: "
        + ("fits" if result.fits else "DOES NOT FIT")
        + " |"
    )
    if result.kv_note:
        lines += ["", f"Does not fit: {result.kv_note}."]
    if o.runner == "pooling":
        lines += ["", "No decode estimate: a pooling model runs prefill steps only."]
    if result.estimates:
        per = " per engine" if engines > 1 else ""
        lines += [
            "",
            f"Decode estimate, {result.context} tokens of context per sequence: XLA's cost "
            "analysis of the compiled decode programs (an upper bound: it counts on-chip "
            "copies too), and the hand roofline (weights + the KV pages read, once each, "
            "over the HBM bandwidth: the floor). No collectives in either.",
            "",
            f"| batch | cost analysis: step ms | tokens/s{per} | GB moved per device | bound "
            f"| hand roofline: step ms | tokens/s{per} | GB per device | KV holds the batch |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in result.estimates:
            lines.append(
                f"| {e.batch} | {e.seconds * 1e3:.2f} | {e.tokens_per_s:,.0f} | "
                f"{e.bytes_moved / 1e9:.1f} | {e.bound} | {e.hand_seconds(spec) * 1e3:.2f} | "
                f"{e.hand_tokens_per_s(spec):,.0f} | {e.hand_bytes / 1e9:.1f} | "
                f"{'yes' if e.kv_fits else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or config JSON")
    parser.add_argument("--topology", required=True, help="e.g. v5e:1x1, v6e:2x4, TPU7x:2x2x1")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--enable-expert-parallel", action="store_true")
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--quantization")
    parser.add_argument("--no-async-scheduling", action="store_true")
    parser.add_argument("--enable-lora", action="store_true", help="also the LoRA programs")
    parser.add_argument("--max-loras", type=int)
    parser.add_argument("--max-lora-rank", type=int)
    parser.add_argument(
        "--runner", choices=("generate", "pooling"), help="vLLM's --runner (pooling: embeddings)"
    )
    parser.add_argument(
        "--context", type=int, default=DEFAULT_CONTEXT, help="tokens per sequence in the estimate"
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=list(BATCHES), help="decode batch sizes"
    )
    parser.add_argument(
        "--subset",
        choices=("all", "estimate"),
        default="all",
        help="all: every program start-up precompiles; estimate: only the largest forward and "
        "the decode programs the estimate uses",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-program progress lines")
    parser.add_argument("--no-program-table", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: plan, print the report; exit 1 when a program failed or it does not fit."""
    args = parse_args(argv)
    from tpu_plugin import envs

    # This host's own JAX backend is its CPU (the targets are abstract TPU devices): the
    # plugin runs in-process as on --device cpu, and JAX never opens a TPU backend here.
    envs.default_device("cpu")
    jax.config.update("jax_platforms", "cpu")
    from tpu_plugin.tools.tpu_aot import EngineOptions

    options = EngineOptions(
        model=args.model,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        data_parallel_size=args.data_parallel_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        dtype=args.dtype,
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        async_scheduling=False if args.no_async_scheduling else None,
        enable_lora=args.enable_lora,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        runner=args.runner,
    )
    try:
        result = plan(
            options,
            args.topology,
            subset=args.subset,
            context=args.context,
            batches=args.batches,
            progress=None if args.quiet else sys.stderr,
        )
    except ValueError as error:
        print(f"plan: {error}", file=sys.stderr)
        return 2
    print(format_report(result, programs=not args.no_program_table))
    return 0 if not result.failed and result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
