"""vLLM's own PyTorch model for an architecture, run through torchax inside one ``jax.jit``.

The model class, its construction and its weight loading are vLLM's (``ModelRegistry`` through
``get_model`` and the default safetensors loader), built on the host in torch. Its parameters
and buffers are then copied out as JAX arrays and become an argument of the jitted step, like
the native models' ``nnx`` state; at trace time ``torch.func.functional_call`` puts them back
into the module as torchax tensors, so every torch op of vLLM's ``forward`` becomes a JAX op.
Attention goes to :mod:`.attention_backend` (the plugin's one paged attention); vLLM's custom
ops run their PyTorch-native forms, and ops torchax cannot lower get JAX forms in :mod:`.ops`.

The step has the native path's contract, ``(params, kv_caches, step) -> (kv_caches, logits)``,
so the runner's inputs, KV pages and sampler are shared by both paths.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger

from tpu_plugin.models.torchax import ops
from tpu_plugin.models.torchax.attention_backend import TorchaxAttentionStep
from tpu_plugin.runner.inputs import StepInputs

logger = init_logger(__name__)


def ensure_single_process_group() -> None:
    """vLLM's parallel layers ask for their tensor-parallel group: give them one of size 1.

    The plugin runs one worker per host without torch.distributed; a single-rank gloo group
    on a private file rendezvous is what vLLM's layers need to build and run unsharded.
    """
    from vllm.distributed import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return
    if not torch.distributed.is_initialized():
        fd, path = tempfile.mkstemp(prefix="tpu-plugin-torchax-rendezvous-")
        os.close(fd)
        os.unlink(path)
        parallel_state.init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"file://{path}",
            backend="gloo",
        )
    parallel_state.ensure_model_parallel_initialized(1, 1)


def _tolerate_jax_accelerator() -> None:
    """Keeps ``torch.accelerator.empty_cache()`` working once torchax is imported.

    Importing torchax registers ``jax`` as torch's accelerator, which has no caching allocator,
    so ``empty_cache()`` fails an internal assert; vLLM calls it after loading weights and at
    engine shutdown. Torch tensors here live on the host, so for ``jax`` there is nothing to
    free; other accelerators keep torch's behaviour. Installed once per process.
    """
    original = torch.accelerator.empty_cache
    if getattr(original, "_tpu_plugin", False):
        return

    def empty_cache() -> None:
        accelerator = torch.accelerator.current_accelerator()
        if accelerator is not None and accelerator.type == "jax":
            return
        original()

    empty_cache._tpu_plugin = True  # type: ignore[attr-defined]
    torch.accelerator.empty_cache = empty_cache


_tolerate_jax_accelerator()


class _Step(torch.nn.Module):
    """Forward plus logits as one module call, so ``functional_call`` swaps weights in both."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, positions=positions)
        # index_select, not ``hidden[...]``: the hidden states may be a torchax view (models
        # that update slices in place), which only aten ops materialise.
        return self.model.compute_logits(torch.index_select(hidden, 0, logits_indices))


class TorchaxModel:
    """vLLM's PyTorch model for ``vllm_config``, loaded on the host, stepped in JAX."""

    def __init__(self, vllm_config: VllmConfig):
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.model_loader import get_model

        self.vllm_config = vllm_config
        with set_current_vllm_config(vllm_config):
            ensure_single_process_group()
            torch_model = get_model(vllm_config=vllm_config).eval()
        self.step_module = _Step(torch_model)
        self.attention_layers = [m for m in torch_model.modules() if isinstance(m, Attention)]
        if not self.attention_layers:
            raise ValueError(f"{type(torch_model).__name__} has no vLLM attention layers")
        self.layer_names = [layer.layer_name for layer in self.attention_layers]
        self.env = ops.torchax_env()
        # Parameters and buffers (rotary tables included): each shared tensor becomes one JAX
        # array, and every name it goes by (tied embeddings) maps to it.
        state: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        by_id: dict[int, str] = {}
        named = [
            *self.step_module.named_buffers(remove_duplicate=False),
            *self.step_module.named_parameters(remove_duplicate=False),
        ]
        for name, tensor in named:
            canonical = by_id.setdefault(id(tensor), name)
            self.aliases[name] = canonical
            state.setdefault(canonical, tensor.detach())
        self.params: dict[str, jax.Array] = self.env.t2j_copy(state)
        # The host copies are dead weight now: the jitted step receives the JAX arrays.
        self.step_module.to("meta")
        logger.info(
            "torchax: %s with %d attention layers, %d weight tensors",
            type(torch_model).__name__,
            len(self.layer_names),
            len(self.params),
        )

    @property
    def kv_cache_dims(self) -> tuple[int, int, int]:
        """``(num_layers, num_kv_heads, head_dim)`` of the KV pages, from vLLM's layers."""
        first = self.attention_layers[0]
        for layer in self.attention_layers:
            if (layer.num_kv_heads, layer.head_size) != (first.num_kv_heads, first.head_size):
                raise ValueError(
                    "attention layers with different KV shapes are not supported on the "
                    "torchax path; use a model whose layers share one KV head count and size"
                )
        return len(self.attention_layers), first.num_kv_heads, first.head_size

    def forward(
        self, params: dict[str, jax.Array], kv_caches: list, step: StepInputs
    ) -> tuple[list, jax.Array]:
        """The jittable step: the same contract as the native models' forward."""
        attention = TorchaxAttentionStep(
            metadata=step.attention, kv_caches=dict(zip(self.layer_names, kv_caches, strict=True))
        )
        tensors, input_ids, positions, indices = self.env.j2t_iso(
            (params, step.input_ids, step.positions, step.logits_indices)
        )
        weights = {name: tensors[canonical] for name, canonical in self.aliases.items()}
        with (
            ops.naming_missing_ops(),
            self.env,
            set_current_vllm_config(self.vllm_config),
            set_forward_context(attention, self.vllm_config, slot_mapping={}),
        ):
            logits = torch.func.functional_call(
                self.step_module, weights, (input_ids, positions, indices), tie_weights=False
            )
        new_caches = [attention.kv_caches[name] for name in self.layer_names]
        return new_caches, self.env.t2j_iso(logits)


def kv_cache_dims(vllm_config: VllmConfig) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` as vLLM reads them from any architecture's
    config (the runner sizes KV pages before the model is built)."""
    model_config, parallel_config = vllm_config.model_config, vllm_config.parallel_config
    return (
        model_config.get_num_layers(parallel_config),
        model_config.get_num_kv_heads(parallel_config),
        model_config.get_head_size(),
    )


def load_torchax_model(
    vllm_config: VllmConfig, plan: Any = None
) -> tuple[TorchaxModel, dict[str, jax.Array], Any]:
    """``(model, params, forward)`` for the runner: ``forward`` is ready for ``jax.jit``."""
    if plan is not None and plan.mesh.size > 1:
        raise ValueError(
            "the torchax path runs on one device; use --tensor-parallel-size 1, or a model "
            "with a JAX port for tensor parallelism"
        )
    model = TorchaxModel(vllm_config)
    expected = kv_cache_dims(vllm_config)
    if model.kv_cache_dims != expected:
        raise ValueError(
            f"{type(model.step_module.model).__name__}: its attention layers hold KV of shape "
            f"(layers, kv_heads, head_dim) = {model.kv_cache_dims}, but the config says "
            f"{expected}; this architecture is not supported on the torchax path"
        )
    return model, model.params, model.forward
