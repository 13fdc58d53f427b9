"""The vLLM platform of tpu-plugin: tells vLLM which worker to start and what is supported.

One class serves the three JAX backends (tpu, cpu, gpu); the backend is ``TPU_PLUGIN_DEVICE``,
set by ``--device`` or by detection. vLLM's own torch tensors (scheduler side, tokenizer
outputs) stay on the host, so ``device_type`` is ``cpu``; the accelerator belongs to JAX.
"""

from __future__ import annotations

import argparse
import os
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


def unsupported_sampling_fields(params: SamplingParams) -> list[str]:
    """The fields of ``params`` that the sampler does not implement yet (empty when fine)."""
    checks = {
        "min_p": params.min_p > 0.0,
        "presence_penalty": params.presence_penalty != 0.0,
        "frequency_penalty": params.frequency_penalty != 0.0,
        "repetition_penalty": params.repetition_penalty != 1.0,
        "logit_bias": bool(params.logit_bias),
        "allowed_token_ids": bool(params.allowed_token_ids),
        "bad_words": bool(params.bad_words),
        "min_tokens": params.min_tokens > 0,
        "prompt_logprobs": params.prompt_logprobs is not None,
        "structured_outputs": params.structured_outputs is not None,
        "logits_processors": bool(getattr(params, "logits_processors", None)),
    }
    return [name for name, used in checks.items() if used]


class TpuPluginPlatform(Platform):
    """JAX on TPU, CPU or GPU behind vLLM's v1 engine."""

    _enum = PlatformEnum.OOT
    device_name: str = "tpu"
    device_type: str = "cpu"
    dispatch_key: str = "CPU"
    dist_backend: str = "gloo"
    ray_device_key: str = ""
    simple_compile_backend: str = "eager"

    def __init__(self) -> None:
        super().__init__()
        self.device_name = envs.active_device()

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
        """Shows the restored ``--device`` flag in ``vllm serve --help``.

        The flag itself is consumed during platform detection (before parsing), see
        :func:`tpu_plugin.take_device_flag`; this entry only documents it.
        """
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
    def update_block_size_for_backend(cls, vllm_config: VllmConfig) -> None:
        """Block size stays as configured: the attention kernels take any page size 16–256."""

    @classmethod
    def check_and_update_config(cls, vllm_config: VllmConfig) -> None:
        from vllm.config import CompilationMode, CUDAGraphMode

        from tpu_plugin.models.registry import check_architecture

        model_config = vllm_config.model_config
        if model_config is not None:
            check_architecture(list(model_config.architectures or []))
            if model_config.runner_type != "generate":
                raise ValueError(
                    "tpu-plugin runs generative models only "
                    f"(got runner {model_config.runner_type!r})"
                )

        parallel_config = vllm_config.parallel_config
        if parallel_config.world_size > 1:
            raise ValueError(
                f"tpu-plugin does not support tensor/pipeline parallelism yet (world size "
                f"{parallel_config.world_size}); use --tensor-parallel-size 1"
            )
        if parallel_config.worker_cls == "auto":
            parallel_config.worker_cls = WORKER_CLASS
        if parallel_config.distributed_executor_backend in (None, "mp"):
            parallel_config.distributed_executor_backend = "uni"

        # Engine processes must not fork a parent in which JAX/XLA threads already run
        # (a forked XLA runtime deadlocks); spawn them, as vLLM's CPU platform does.
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"

        compilation_config = vllm_config.compilation_config
        compilation_config.mode = CompilationMode.NONE  # JAX compiles; no torch.compile
        compilation_config.cudagraph_mode = CUDAGraphMode.NONE
        compilation_config.cudagraph_capture_sizes = []

        if vllm_config.scheduler_config.async_scheduling:
            logger.info("tpu-plugin: async scheduling is not supported yet; running synchronously")
        vllm_config.scheduler_config.async_scheduling = False

        if vllm_config.speculative_config is not None:
            raise ValueError("tpu-plugin does not support speculative decoding yet; drop it")
        if vllm_config.lora_config is not None:
            raise ValueError("tpu-plugin does not support LoRA yet; drop --enable-lora")

    @classmethod
    def validate_request(
        cls, processed_inputs: Any, params: SamplingParams | PoolingParams
    ) -> None:
        """Rejects (HTTP 400) sampling options the JAX sampler does not implement yet."""
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
