"""Which Hugging Face architectures have a native JAX port, and which class implements each.

The registry is the single place that answers "can this model run natively?"; the platform
asks it at start-up so an unsupported model fails before any process is spawned.
"""

from __future__ import annotations

import importlib

from tpu_plugin import envs

# architecture name (config.json "architectures") -> "module:Class" of the flax nnx port
_JAX_MODELS: dict[str, str] = {
    "Gemma3ForCausalLM": "tpu_plugin.models.gemma3:Gemma3ForCausalLM",
    "LlamaForCausalLM": "tpu_plugin.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "tpu_plugin.models.mistral:MistralForCausalLM",
    "Phi3ForCausalLM": "tpu_plugin.models.phi3:Phi3ForCausalLM",
    "Qwen2ForCausalLM": "tpu_plugin.models.llama:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "tpu_plugin.models.qwen3:Qwen3ForCausalLM",
}


def supported_architectures() -> list[str]:
    """The architectures with a native JAX port, sorted."""
    return sorted(_JAX_MODELS)


class UnsupportedModelError(ValueError):
    """The model cannot run on this plugin; the message names the fix."""


def check_architecture(architectures: list[str]) -> str:
    """Returns the first architecture this plugin can run, or raises naming the options."""
    impl = envs.model_impl()
    if impl == "torchax":
        raise UnsupportedModelError(
            "TPU_PLUGIN_MODEL_IMPL=torchax: the torchax path is not implemented yet; "
            "unset it to use the native JAX models (" + ", ".join(supported_architectures()) + ")"
        )
    for arch in architectures:
        if arch in _JAX_MODELS:
            return arch
    raise UnsupportedModelError(
        f"{', '.join(architectures) or 'this model'} has no JAX port in tpu-plugin; supported "
        f"architectures: {', '.join(supported_architectures())} (the torchax fallback for "
        "other architectures is not implemented yet)"
    )


def resolve_model_class(architectures: list[str]) -> type:
    """The flax nnx class for the model's architecture."""
    module_name, class_name = _JAX_MODELS[check_architecture(architectures)].split(":")
    return getattr(importlib.import_module(module_name), class_name)
