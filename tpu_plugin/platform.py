"""The vLLM platform of tpu-plugin: tells vLLM which worker to start and what is supported.

One class serves the three JAX backends (tpu, cpu, gpu); the backend is ``TPU_PLUGIN_DEVICE``,
set by ``--device`` or by detection. vLLM's own torch tensors (scheduler side, tokenizer
outputs) stay on the host, so ``device_type`` is ``cpu``; the accelerator belongs to JAX.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

import psutil
import torch
from vllm.logger import init_logger
from vllm.platforms.interface import Platform, PlatformEnum

from tpu_plugin import envs

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.pooling_params import PoolingParams
    from vllm.sampling_params import SamplingParams

logger = init_logger(__name__)

WORKER_CLASS = "tpu_plugin.worker.TpuPluginWorker"
# The CPU's default step size: tokens per core (512 on 2 cores), see cpu_batch_defaults().
CPU_TOKENS_PER_CORE = 256


def unsupported_sampling_fields(params: SamplingParams) -> list[str]:
    """The fields of ``params`` that the sampler does not implement (empty when fine).

    Everything of vLLM's v1 sampler is implemented (tpu_plugin/runner/sampler.py); these are
    the extensions of vLLM's second (GPU) runner that are not: prompt logprobs of chosen token
    ids or from a start position, watermarking and thinking budgets.
    """
    checks = {
        "prompt_logprob_token_ids": bool(getattr(params, "prompt_logprob_token_ids", None)),
        "prompt_logprob_start": getattr(params, "prompt_logprob_start", None) is not None,
        "watermarking": bool(getattr(params, "watermarking", None)),
        "thinking_token_budget": getattr(params, "thinking_token_budget", None) is not None,
        "logits_processors": bool(getattr(params, "logits_processors", None)),
    }
    return [name for name, used in checks.items() if used]


def cpu_batch_defaults() -> None:
    """Gives ``--max-num-batched-tokens`` a CPU-sized default on the CPU backend.

    Without the flag vLLM sizes a step for a GPU (8192 tokens for ``vllm.LLM``, 2048 for
    ``vllm serve``; its own CPU backend 4096 / 2048). Here every power-of-two token bucket up
    to that is one more program precompiled at start-up (seconds each on 2 cores), and an
    8192-token step of a 135M model takes tens of seconds on 2 cores while other requests wait
    for it; 256 tokens per core already keep the cores busy. vLLM reads per-device defaults
    from ``EngineArgs.get_batch_defaults``, which knows only its own platforms, so the plugin
    wraps it once: on CPU the token default becomes ``min(vLLM's, 256 x cores)``, at least 256.
    An explicit ``--max-num-batched-tokens`` wins as always; ``max_num_seqs`` keeps vLLM's
    default.
    """
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.get_batch_defaults.__func__
    if getattr(original, "_tpu_plugin", False):
        return

    def get_batch_defaults(cls: type, world_size: int) -> tuple[dict, dict]:
        tokens, seqs = original(cls, world_size)
        # Not while the TPU planner builds a TPU engine's config from a CPU host.
        if envs.active_device() == "cpu" and envs.compile_target() is None:
            cap = max(256, CPU_TOKENS_PER_CORE * (os.cpu_count() or 1))
            tokens = {context: min(value, cap) for context, value in tokens.items()}
        return tokens, seqs

    get_batch_defaults._tpu_plugin = True  # type: ignore[attr-defined]
    EngineArgs.get_batch_defaults = classmethod(get_batch_defaults)  # type: ignore[method-assign]


class TpuPluginPlatform(Platform):
    """JAX on TPU, CPU or GPU behind vLLM's v1 engine."""

    _enum = PlatformEnum.OOT
    device_name: str = "tpu"
    device_type: str = "cpu"
    dispatch_key: str = "CPU"
    dist_backend: str = "gloo"
    ray_device_key: str = ""
    simple_compile_backend: str = "eager"
    # Copied to vLLM's Ray workers (each worker is a JAX process of one global mesh).
    additional_env_vars: list[str] = [
        "TPU_PLUGIN_DEVICE",
        "TPU_PLUGIN_ATTENTION",
        "TPU_PLUGIN_MOE",
        "TPU_PLUGIN_QUANTIZED_MATMUL",
        "TPU_PLUGIN_MODEL_IMPL",
        "TPU_PLUGIN_HOME",
        "TPU_PLUGIN_COMPILE_CACHE",
        "XLA_FLAGS",
        "JAX_PLATFORMS",
    ]

    def __init__(self) -> None:
        super().__init__()
        self.device_name = envs.active_device()
        from tpu_plugin.parallel.mesh import RAY_DEVICE_KEYS

        self.ray_device_key = RAY_DEVICE_KEYS[self.device_name]

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        # On CPU, XLA's float32 matmuls are the fast path; bf16 is emulated.
        if envs.device() == "cpu":
            return [torch.float32, torch.bfloat16, torch.float16]
        return [torch.bfloat16, torch.float32, torch.float16]

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return envs.active_device()

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        from tpu_plugin.worker import device_memory_bytes

        return device_memory_bytes()

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False

    @classmethod
    def inference_mode(cls):
        return torch.no_grad()

    @classmethod
    def get_current_memory_usage(cls, device: Any = None) -> float:
        return float(psutil.Process().memory_info().rss)

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        """JAX picks its devices itself; torch stays on the host."""

    @classmethod
    def pre_register_and_update(cls, parser: argparse.ArgumentParser | None = None) -> None:
        """Shows the restored ``--device`` flag in ``vllm serve --help``, and sets the CPU's
        step-size default (:func:`cpu_batch_defaults`) before vLLM fills in its defaults.

        The flag itself is consumed during platform detection (before parsing), see
        :func:`tpu_plugin.take_device_flag`; this entry only documents it.
        """
        cpu_batch_defaults()
        if parser is None:
            return
        try:
            parser.add_argument(
                "--device",
                choices=envs.DEVICES,
                default=None,
                help="tpu-plugin: run on this JAX backend (same as TPU_PLUGIN_DEVICE).",
            )
        except argparse.ArgumentError:
            pass  # another component already defines it

    @classmethod
    def get_attn_backend_cls(
        cls, selected_backend: Any, attn_selector_config: Any, **_: Any
    ) -> str:
        """vLLM's attention layers (torchax path) call the plugin's ragged paged attention."""
        from tpu_plugin.models.torchax.attention_backend import BACKEND_QUALNAME

        return BACKEND_QUALNAME

    @classmethod
    def update_block_size_for_backend(cls, vllm_config: VllmConfig) -> None:
        """Block size stays as configured: the attention kernels take any page size 16–256."""

    @classmethod
    def check_and_update_config(cls, vllm_config: VllmConfig) -> None:
        from vllm.config import CompilationMode, CUDAGraphMode

        from tpu_plugin import _is_vllm_cli
        from tpu_plugin.models.registry import check_architecture
        from tpu_plugin.startup import forward_sigterm_to_starting_engines

        if _is_vllm_cli() and "serve" in sys.argv[1:2]:  # the API server (startup.py says why)
            forward_sigterm_to_starting_engines()
        model_config = vllm_config.model_config
        if model_config is not None:
            check_architecture(list(model_config.architectures or []))
            if model_config.runner_type == "pooling":  # tpu_plugin/runner/pooling.py
                from tpu_plugin.runner.pooling import check_pooling_config

                check_pooling_config(vllm_config)
            elif model_config.runner_type != "generate":
                raise ValueError(
                    "tpu-plugin runs generative and pooling models only "
                    f"(got runner {model_config.runner_type!r}); use --runner generate or pooling"
                )

        # Parallelism (tpu_plugin/parallel): one JAX process drives all devices of its host, so
        # --tensor-parallel-size keeps vLLM's single-worker executor and becomes a device mesh
        # in that worker; under Ray there is one worker per process, joined by jax.distributed.
        from tpu_plugin.parallel.mesh import check_executor, check_parallel_config

        parallel_config = vllm_config.parallel_config
        check_parallel_config(
            parallel_config, model_config.hf_text_config if model_config is not None else None
        )
        if parallel_config.worker_cls == "auto":
            parallel_config.worker_cls = WORKER_CLASS
        check_executor(parallel_config)
        if parallel_config.distributed_executor_backend in (None, "mp"):
            parallel_config.distributed_executor_backend = "uni"

        # Engine processes must not fork a parent in which JAX/XLA threads already run
        # (a forked XLA runtime deadlocks); spawn them, as vLLM's CPU platform does.
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"

        compilation_config = vllm_config.compilation_config
        compilation_config.mode = CompilationMode.NONE  # JAX compiles; no torch.compile
        compilation_config.cudagraph_mode = CUDAGraphMode.NONE
        compilation_config.cudagraph_capture_sizes = []

        # Async scheduling (tpu_plugin/runner/async_output.py) needs the sampled tokens of one
        # step on the device of the next: one process drives all devices. Ray's workers are
        # one process per host, so they schedule synchronously.
        if (
            vllm_config.scheduler_config.async_scheduling
            and parallel_config.distributed_executor_backend != "uni"
        ):
            logger.info(
                "tpu-plugin: async scheduling runs in single-process engines only; running "
                "synchronously under %s",
                parallel_config.distributed_executor_backend,
            )
            vllm_config.scheduler_config.async_scheduling = False

        speculative = vllm_config.speculative_config
        if speculative is not None:  # tpu_plugin/runner/spec_decode.py
            if speculative.method != "ngram" or speculative.rejection_sample_method != "standard":
                raise ValueError(
                    "tpu-plugin supports speculative decoding with the n-gram proposer only "
                    f"(got method {speculative.method!r}, rejection_sample_method "
                    f"{speculative.rejection_sample_method!r}); use --speculative-config "
                    '\'{"method": "ngram", "num_speculative_tokens": 4}\' or drop it'
                )
            import importlib.util

            if importlib.util.find_spec("numba") is None:
                raise ValueError(
                    "vLLM's n-gram proposer needs numba, which is not installed; "
                    "pip install numba==0.68.1"
                )
            if vllm_config.scheduler_config.async_scheduling:
                logger.info(
                    "tpu-plugin: n-gram speculative decoding schedules synchronously "
                    "(drafts are proposed from the host copy of each step's tokens)"
                )
                vllm_config.scheduler_config.async_scheduling = False
        if vllm_config.lora_config is not None:  # tpu_plugin/runner/lora.py
            from tpu_plugin.runner.lora import check_lora_config

            check_lora_config(vllm_config)
            if _is_vllm_cli() and "serve" in sys.argv[1:2]:  # refused adapters: 400s
                from tpu_plugin import lora_api

                lora_api.install()

    @classmethod
    def validate_request(
        cls, processed_inputs: Any, params: SamplingParams | PoolingParams
    ) -> None:
        """Rejects (HTTP 400) the few sampling options the JAX sampler does not implement."""
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import SamplingParams

        if isinstance(params, SamplingParams):
            unsupported = unsupported_sampling_fields(params)
            if unsupported:
                raise VLLMValidationError(
                    "tpu-plugin does not support these sampling parameters yet: "
                    + ", ".join(unsupported),
                    parameter=unsupported[0],
                )
