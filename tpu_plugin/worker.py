"""The vLLM worker: picks the JAX backend, sizes the KV cache, and hands steps to the runner.

vLLM's engine core calls these methods (``init_device``, ``load_model``, ``get_kv_cache_spec``,
``determine_available_memory``, ``initialize_from_config``, ``compile_or_warm_up_model``, then
``execute_model``/``sample_tokens`` every step).
"""

from __future__ import annotations

import os

import jax
import psutil
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheSpec
from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput
from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

from tpu_plugin import envs
from tpu_plugin.runner.model_runner import JaxModelRunner
from tpu_plugin.startup import StartupError, engine_startup_errors

logger = init_logger(__name__)

# Pages are ``[block, token, kv_head, dim]`` per layer: vLLM's ``LBNHC`` layout.
KV_CACHE_LAYOUTS = ("LBNHC",)

# TPU_PLUGIN_DEVICE -> the name JAX gives the backend
JAX_PLATFORM = {"tpu": "tpu", "cpu": "cpu", "gpu": "cuda"}


def select_jax_backend() -> str:
    """Restricts JAX to the chosen backend (before it initialises) and returns its name."""
    platform = JAX_PLATFORM[envs.active_device()]
    if platform == "cuda":
        # XLA preallocates 75% of GPU memory by default; the KV budget below decides instead.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    jax.config.update("jax_platforms", platform)
    try:
        jax.devices(platform)
    except RuntimeError as error:
        raise StartupError(
            f"--device {envs.device()}: JAX finds no {platform} device ({error}); pick a "
            "--device this host has (cpu always works)"
        ) from None
    return platform


def device_memory_bytes() -> int:
    """Memory of the first device: host RAM on CPU, the device's HBM otherwise."""
    if envs.active_device() == "cpu":
        return psutil.virtual_memory().total
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit", 0))


def device_memory_in_use() -> int:
    if envs.active_device() == "cpu":
        return psutil.Process(os.getpid()).memory_info().rss
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_in_use", 0))


def page_budget(device_bytes: int, kv_shards: int, device: str) -> int:
    """The engine's KV page budget from one device's free bytes.

    vLLM sizes a page with all KV heads; when the mesh splits every page over ``kv_shards``
    devices, each holds ``1 / kv_shards`` of it, so the pages fit ``kv_shards`` times the
    bytes. CPU devices share the host's memory, where one device's bytes are all of it.
    """
    return device_bytes * kv_shards if device != "cpu" else device_bytes


class TpuPluginWorker(WorkerBase):
    """One worker per process; owns the devices JAX sees."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        local_rank: int,
        rank: int,
        distributed_init_method: str,
        is_driver_worker: bool = False,
    ):
        super().__init__(vllm_config, local_rank, rank, distributed_init_method, is_driver_worker)
        self.model_runner: JaxModelRunner | None = None

    def init_device(self) -> None:
        from tpu_plugin.parallel import plan_for
        from tpu_plugin.parallel.distributed import init_distributed

        with engine_startup_errors():
            init_distributed(self.parallel_config, self.rank, self.distributed_init_method)
            platform = select_jax_backend()
            plan = plan_for(self.vllm_config)  # the mesh; checks the parallel sizes
        logger.info("tpu-plugin worker on JAX %s: mesh %s", platform, plan.mesh)
        self.model_runner = JaxModelRunner(self.vllm_config)
        self.model_runner.sharding_plan = plan

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        if load_dummy_weights:
            raise ValueError("tpu-plugin loads real checkpoints only (no --load-format dummy)")
        with engine_startup_errors():
            self.model_runner.load_model()

    def get_model(self):
        return self.model_runner.model

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        return self.model_runner.get_kv_cache_spec()

    def get_supported_kv_cache_layouts(self) -> list[str]:
        return list(KV_CACHE_LAYOUTS)

    def determine_available_memory(self) -> int:
        """Bytes for KV pages: the explicit option, else utilization x device memory - used.

        Both are one device's bytes (vLLM's meaning); on TPU and GPU, pages split over the
        mesh's KV heads make the engine's page budget that many times larger.
        """
        with engine_startup_errors():
            explicit = self.cache_config.kv_cache_memory_bytes
            if explicit is not None:
                budget = int(explicit)
            else:
                total = device_memory_bytes()
                utilization = self.cache_config.gpu_memory_utilization
                budget = int(total * utilization) - device_memory_in_use()
                if envs.active_device() == "cpu":
                    budget = min(budget, int(psutil.virtual_memory().available * 0.9))
                if budget <= 0:
                    raise StartupError(
                        f"no memory left for the KV cache ({total / 2**30:.1f} GiB device "
                        f"memory at --gpu-memory-utilization {utilization}); raise it or set "
                        "--kv-cache-memory-bytes"
                    )
            budget = page_budget(budget, self._kv_page_shards(), envs.active_device())
            self._check_budget_holds_one_sequence(budget)
        logger.info("KV cache budget: %.2f GiB", budget / 2**30)
        return budget

    def _kv_page_shards(self) -> int:
        """Into how many parts the mesh splits every KV page (1 when replicated)."""
        runner = self.model_runner
        shape = (1, runner.block_size, runner.num_kv_heads, runner.head_dim)
        return runner.sharding_plan.kv_shards(shape)

    def _check_budget_holds_one_sequence(self, budget: int) -> None:
        """Fails unless ``budget`` holds one ``max_model_len`` sequence (plus the null block).

        vLLM checks this too, later and with a traceback; checking here ends start-up with the
        sizes and both ways out. vLLM keeps block 0 as its null block, hence the extra block.
        """
        specs = list(self.get_kv_cache_spec().values())
        block_size = specs[0].block_size
        block_bytes = sum(spec.page_size_bytes for spec in specs)
        max_len = self.model_config.max_model_len
        needed = (-(-max_len // block_size) + 1) * block_bytes
        if budget < needed:
            holds = max(budget // block_bytes - 1, 0) * block_size
            raise StartupError(
                f"the KV cache budget ({budget} bytes) holds {holds} tokens, less than "
                f"one --max-model-len {max_len} sequence; raise --kv-cache-memory-bytes to at "
                f"least {needed} (or --gpu-memory-utilization) or lower --max-model-len to "
                f"{holds} or less"
            )

    def initialize_from_config(self, kv_cache_config: KVCacheConfig) -> None:
        self.model_runner.initialize_kv_cache(kv_cache_config)

    def compile_or_warm_up_model(self) -> CompilationTimes:
        """Compiles every step bucket now, so serving never waits on XLA (precompile.py).

        ``TPU_PLUGIN_PRECOMPILE=0`` skips it: buckets then compile on first use.
        """
        from tpu_plugin.runner.precompile import precompile

        runner = self.model_runner
        if not envs.precompile() or runner._aot_forward is None:
            if envs.precompile():
                logger.info("multi-process run: step buckets compile on first use")
            return CompilationTimes(language_model=0.0, encoder=0.0)
        return CompilationTimes(language_model=precompile(runner), encoder=0.0)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        return self.model_runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        return self.model_runner.sample_tokens(grammar_output)

    def execute_dummy_batch(self) -> None:
        """vLLM's MoE data parallelism steps idle ranks so cross-rank expert collectives line
        up; here every DP rank has its own mesh (experts split inside it), so there is none."""
        return None

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        """The n-gram drafts of the last step (speculative decoding), else None."""
        return self.model_runner.take_draft_token_ids() if self.model_runner else None

    # ---- LoRA (vLLM's adapter RPCs; tpu_plugin/runner/lora.py) -----------------------------
    def _lora(self):
        lora = self.model_runner.lora if self.model_runner is not None else None
        if lora is None:
            raise ValueError("LoRA is not enabled; start the engine with --enable-lora")
        return lora

    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self._lora().manager.add_adapter(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self._lora().manager.remove_adapter(lora_id)

    def pin_lora(self, lora_id: int) -> bool:
        return self._lora().manager.pin_adapter(lora_id)

    def list_loras(self) -> set[int]:
        return self._lora().manager.list_adapters()

    def check_lora_adapter(self, lora_name: str, lora_int_id: int, lora_path: str) -> str | None:
        """Why the adapter cannot be served here, or None (the API server's 400s). Plain
        fields: a ``LoRARequest`` in ``collective_rpc`` args arrives as an untyped list."""
        return self._lora().check_adapter(LoRARequest(lora_name, lora_int_id, lora_path))

    def get_supported_tasks(self) -> tuple[str, ...]:
        return self.model_runner.supported_tasks()

    def get_cache_block_size_bytes(self) -> int:
        specs = self.get_kv_cache_spec()
        return sum(spec.page_size_bytes for spec in specs.values())

    def update_max_model_len(self, max_model_len: int) -> None:
        self.model_config.max_model_len = max_model_len

    def check_health(self) -> None:
        return None

    def reset_mm_cache(self) -> None:
        return None

    def sleep(self, level: int = 1) -> None:
        raise NotImplementedError("tpu-plugin has no sleep mode yet")

    def wake_up(self, tags: list[str] | None = None) -> None:
        raise NotImplementedError("tpu-plugin has no sleep mode yet")

    def shutdown(self) -> None:
        self.model_runner = None
