"""The engine's step programs, compiled ahead of time for a TPU topology on any host.

libtpu carries the TPU compiler, and JAX compiles for abstract TPU devices
(``jax.experimental.topologies``) on a machine without a TPU. :class:`AbstractEngine` is the
engine's own runner (``JaxModelRunner``, built from a real ``VllmConfig``) with its
parameters and KV pages replaced by ``jax.ShapeDtypeStruct`` carrying the real shardings on a
mesh of the topology's devices; its forward is the runner's (``model_runner.jitted_forward``),
its program list start-up precompilation's own (``compile.startup_programs``: every
forward bucket, every sampler variant per sequence bucket, the async token-recording
program), with the TPU's static sampler flags. Nothing is loaded and nothing
runs: each program is lowered and compiled, with the Pallas TPU kernels (Mosaic, never
interpret mode), and the compiled program's memory and cost analyses are kept.

Used by the planner (``tpu_plugin.tools.plan``) and the TPU compile tests (``tests/tpu``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from tpu_plugin import envs
from tpu_plugin.layers.moe_offload import OffloadedCaches

# Single-chip topologies the TPU runtime refuses ("v5e:1x1" is not divisible by the host's
# 2x2 chip bounds): the chips are taken from the smallest topology that has them.
_HOST_TOPOLOGY = {"v5e": "2x2", "v6e": "2x2", "v5p": "2x2x1", "TPU7x": "2x2x1", "v4": "2x2x1"}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Drops what libtpu writes to fd 2 while it starts on a host without TPU chips (warnings
    that it cannot find the chips' host bounds and worker addresses, irrelevant to a compile);
    errors still surface as the exception of the call."""
    with open(os.devnull, "w") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(name: str) -> list[Any]:
    """The abstract TPU devices of topology ``name`` (``v6e:2x4``, ``v5e:1x1``, ...).

    One-chip slices are taken as the first chip of the host's smallest topology, which the
    runtime accepts.
    """
    from jax.experimental import topologies

    generation, _, shape = name.partition(":")
    if not re.fullmatch(r"\d+(x\d+)*", shape):
        raise ValueError(f"topology {name!r} is not GENERATION:AxB[xC] (e.g. v6e:2x4)")
    single = int(np.prod([int(d) for d in shape.split("x")])) == 1
    host = _HOST_TOPOLOGY.get(generation) if single else None
    envs.share_libtpu()  # before libtpu loads: concurrent planners must not lock each other out
    with _quiet_stderr():
        try:
            topology = topologies.get_topology_desc(
                topology_name=f"{generation}:{host}" if host else name, platform="tpu"
            )
        except Exception as error:  # the runtime's own words
            raise ValueError(f"TPU topology {name!r}: {error}") from None
    devices = list(topology.devices)
    if host:  # the first chip: its devices (two on TPU7x, one TensorCore each)
        per_chip = len(devices) // int(np.prod([int(d) for d in host.split("x")]))
        devices = devices[:per_chip]
    return devices


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The vLLM engine arguments that change the compiled programs (None: vLLM's default)."""

    model: str
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    data_parallel_size: int = 1
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    dtype: str = "bfloat16"
    block_size: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    async_scheduling: bool | None = None
    enable_lora: bool = False  # adds each forward's LoRA variant (runner/lora.py)
    max_loras: int | None = None
    max_lora_rank: int | None = None
    runner: str | None = None  # "generate" or "pooling" (vLLM's --runner)


def model_directory(model: str) -> str:
    """A directory vLLM can read the config from: ``model`` itself, or, for a config JSON
    file, a temporary directory holding it as ``config.json`` (no weights are needed)."""
    if os.path.isdir(model):
        return model
    if os.path.isfile(model):
        with open(model) as f:
            config = json.load(f)
        directory = tempfile.mkdtemp(prefix="tpu-plan-")
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f)
        return directory
    raise ValueError(f"--model {model!r} is neither a checkpoint directory nor a config JSON file")


def engine_config(options: EngineOptions) -> Any:
    """The ``VllmConfig`` ``vllm serve`` builds for these options (tokenizer not loaded)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    fields = {
        k: v for k, v in dataclasses.asdict(options).items() if k != "model" and v is not None
    }
    args = EngineArgs(model=model_directory(options.model), skip_tokenizer_init=True, **fields)
    return args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)


@dataclasses.dataclass
class Program:
    """One program start-up compiles (``compile.startup_programs``) and how to lower it."""

    item: Any  # compile.StartupProgram
    lower: Callable[[], Any]

    @property
    def kind(self) -> str:
        """ "forward", "sampler" or "record"."""
        return self.item.kind

    @property
    def label(self) -> str:
        return self.item.label

    @property
    def bucket(self) -> Any:
        """A forward's compile.StepBucket (None for the others)."""
        return self.item.bucket

    @property
    def seqs(self) -> int:
        return self.item.seqs

    @property
    def flags(self) -> dict[str, Any] | None:
        """A sampler's static flags."""
        return self.item.flags


@dataclasses.dataclass
class Compiled:
    """A program's compile: seconds, the compiler's error or its memory and cost analyses."""

    program: Program
    seconds: float
    error: str | None = None
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    mosaic_calls: int = 0  # Pallas TPU kernels in the compiled program

    @property
    def peak_bytes(self) -> int:
        """Per-device bytes live while it runs: arguments, outputs not aliased to an
        argument (donated KV pages are), temporaries, and the program's code."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )


def _abstract(tree: Any, sharding: Any) -> Any:
    """Concrete (host or CPU) arrays of ``tree`` as ``ShapeDtypeStruct`` with ``sharding``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _shard_bytes(tree: Any, host: bool = False) -> int:
    """Bytes one device holds of ``tree``'s ``ShapeDtypeStruct`` leaves (their shardings) in
    its own memory, or with ``host`` in host memory (MoE offload's experts)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        kind = getattr(leaf.sharding, "memory_kind", None)
        if (kind is not None and "host" in kind) != host:
            continue
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


class AbstractEngine:
    """The runner of ``vllm_config`` on ``devices`` (one engine: a data-parallel rank's
    ``tensor_parallel_size`` devices) with abstract parameters; KV pages via :meth:`set_kv`."""

    def __init__(self, vllm_config: Any, devices: list[Any]):
        from tpu_plugin.models.loader import abstract_model
        from tpu_plugin.parallel import ShardingPlan
        from tpu_plugin.parallel.mesh import build_mesh, layout_from
        from tpu_plugin.runner.expert_cache import ExpertOffload
        from tpu_plugin.runner.model_runner import JaxModelRunner, jitted_forward

        self.vllm_config = vllm_config
        self.runner = runner = JaxModelRunner(vllm_config)
        if runner.model_impl != "jax":
            raise ValueError(
                f"{', '.join(runner.model_config.architectures or [])} runs through torchax, "
                "which builds vLLM's PyTorch model with its weights on the host; the planner "
                "compiles native JAX ports only"
            )
        parallel = vllm_config.parallel_config
        tp = parallel.tensor_parallel_size
        layout = layout_from(runner.hf_config, tp, bool(parallel.enable_expert_parallel))
        self.plan = ShardingPlan(build_mesh(tp, devices), layout)
        runner.sharding_plan = self.plan
        adapt = None
        if vllm_config.lora_config is not None:  # the adapter slots, as the runner adds

            def adapt(model: nnx.Module) -> None:
                from tpu_plugin.runner.lora import LoRARunner

                runner.lora = LoRARunner(vllm_config, model, runner.dtype)

        # The parameters serving loads, quantized layers included (models/loader.py).
        abstract = abstract_model(
            runner.hf_config, runner.dtype, runner.quant, drop=runner.unused_modules, adapt=adapt
        )
        # MoE offload (runner/expert_cache.py): routed experts in host memory, a device cache.
        self.offload = ExpertOffload.for_runner(runner, self.plan)
        host = self.offload.abstract(abstract) if self.offload else None
        graphdef, state = nnx.split(abstract)
        self.params = self.plan.abstract_params(state)
        if self.offload:
            self.params = (self.params, host)
        # A pooling model's forward returns its pooled rows (runner/pooling.py), as served.
        self.forward = jitted_forward(graphdef, self.plan, runner.pooling, self.offload)
        self.kv_caches: list = []
        self.num_blocks = 0

    @property
    def weight_bytes(self) -> int:
        """Parameter bytes on one device, with MoE offload's device expert cache (allocated
        before the KV pages, as the runner does)."""
        cache = self.offload.cache if self.offload else None
        return _shard_bytes(self.params) + _shard_bytes(cache)

    @property
    def host_bytes(self) -> int:
        """Bytes in host memory (MoE offload's routed experts)."""
        return _shard_bytes(self.params, host=True)

    @property
    def kv_bytes(self) -> int:
        """KV page bytes on one device."""
        caches = self.kv_caches
        return _shard_bytes(caches.layers if isinstance(caches, OffloadedCaches) else caches)

    def kv_shards(self) -> int:
        """Into how many parts the pages are split across the engine's devices."""
        from tpu_plugin.runner import kv_cache

        runner = self.runner
        layout = kv_cache.CacheLayout(runner.num_kv_heads, runner.head_dim, runner.latent_kv)
        return self.plan.kv_shards((1, runner.block_size, layout.num_kv_heads, layout.head_dim))

    def kv_blocks_for(self, budget_bytes: int) -> int:
        """The pages vLLM allocates for a KV budget of ``budget_bytes`` (its own planner,
        ``get_kv_cache_configs``; it raises when one ``max_model_len`` sequence does not fit)."""
        from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
        from vllm.v1.core.kv_cache_planning import get_kv_cache_configs

        from tpu_plugin.worker import KV_CACHE_LAYOUTS

        specs = self.runner.get_kv_cache_spec()
        # The engine core's order: the layout first (the worker's), then the pages.
        resolve_kv_cache_layout(self.vllm_config, [list(KV_CACHE_LAYOUTS)], list(specs.values()))
        return get_kv_cache_configs(self.vllm_config, [specs], [budget_bytes])[0].num_blocks

    def set_kv(self, num_blocks: int) -> None:
        """Abstract KV pages of ``num_blocks`` pages per layer (``kv_cache.abstract_pages``)."""
        from tpu_plugin.runner import kv_cache

        runner = self.runner
        layout = kv_cache.CacheLayout(runner.num_kv_heads, runner.head_dim, runner.latent_kv)
        self.kv_caches = kv_cache.abstract_pages(
            num_blocks,
            runner.block_size,
            runner.num_layers,
            layout,
            runner.kv_dtype,
            self.plan.kv_sharding,
        )
        if self.offload:  # the device expert cache rides with the pages (weight_bytes has it)
            self.kv_caches = OffloadedCaches(self.kv_caches, self.offload.cache)
        self.num_blocks = runner.num_pages = num_blocks

    def _lowering(self, lower: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
        """``lower(*args)`` inside the mesh's abstract TPU mesh, which Pallas TPU kernels need
        to lower from a host whose own devices are CPUs."""

        def run() -> Any:
            with jax.sharding.use_abstract_mesh(self.plan.mesh.abstract_mesh):
                return lower(*args, **kwargs)

        return run

    def programs(self) -> list[Program]:
        """Every program start-up precompilation compiles, in its order, with TPU sampler
        flags (``compile.startup_programs``, the list ``precompile.precompile`` runs)."""
        from tpu_plugin.runner import compile as compile_
        from tpu_plugin.runner.async_output import record_tokens
        from tpu_plugin.runner.sampler import sample

        runner, replicated = self.runner, self.plan.replicated
        if not self.kv_caches:
            raise ValueError("set_kv() first: the programs take the KV pages")
        prev = (
            np.zeros(runner.max_num_seqs, np.int32)
            if runner.scheduler_config.async_scheduling
            else None
        )
        vocab = runner.batch.vocab_size
        programs = []
        for item in compile_.startup_programs(runner, platform="tpu"):
            seqs = item.seqs
            if item.bucket is not None:
                step = compile_.dummy_step(
                    item.bucket, self.num_blocks, runner.block_size, prev, item.lora
                )
                args = (
                    self.forward.lower,
                    self.params,
                    self.kv_caches,
                    _abstract(step, replicated),
                )
                programs.append(Program(item, self._lowering(*args)))
                continue
            if item.kind == "sampler":
                logits = jax.ShapeDtypeStruct((seqs, vocab), np.float32, sharding=replicated)
                inputs = _abstract(compile_.dummy_sampling_inputs(runner, seqs), replicated)
                lower = self._lowering(sample.lower, logits, inputs, **item.flags)
            else:  # "record": the sampled ids of ``seqs`` rows into the slots' table
                table = jax.ShapeDtypeStruct((runner.max_num_seqs,), np.int32, sharding=replicated)
                rows = jax.ShapeDtypeStruct((seqs,), np.int32, sharding=replicated)
                lower = self._lowering(record_tokens.lower, table, rows, rows)
            programs.append(Program(item, lower))
        return programs


def compile_program(program: Program) -> Compiled:
    """Lowers and compiles one program with the TPU compiler; its error is kept, not raised."""
    start = time.perf_counter()
    try:
        compiled = program.lower().compile()
    except Exception as error:  # the compiler's (or lowering's) own message
        message = str(error).strip().splitlines()
        return Compiled(
            program, time.perf_counter() - start, error=message[0] if message else repr(error)
        )
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return Compiled(
        program,
        seconds,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        mosaic_calls=compiled.as_text().count('custom_call_target="tpu_custom_call"'),
    )


@contextlib.contextmanager
def tpu_kernels() -> Iterator[None]:
    """Builds for a TPU host from this host, whose own JAX backend is a CPU: every choice a
    TPU host makes from its backend (``envs.target_platform``: the kernels, the sampler's
    static flags, the page-table widths) is the TPU's, with the Mosaic ragged paged attention,
    fused-MoE and quantized-matmul kernels; the choices before are restored after (the tests
    run CPU engines in the same process)."""
    from tpu_plugin.layers.attention import attention_kernel
    from tpu_plugin.layers.linear import quantized_matmul_kernel
    from tpu_plugin.layers.moe import moe_kernel

    choices = (attention_kernel, moe_kernel, quantized_matmul_kernel)
    override = envs.kernel_override(attention="pallas", moe="pallas", quantized_matmul="pallas")
    with envs.compile_for("tpu"), override:
        for choice in choices:
            choice.cache_clear()
        try:
            yield
        finally:
            for choice in choices:
                choice.cache_clear()
