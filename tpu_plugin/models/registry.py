"""Which Hugging Face architectures have a native JAX port, and which class implements each.

The registry is the single place that answers "can this model run natively?"; the platform
asks it at start-up so an unsupported model fails before any process is spawned.
"""

from __future__ import annotations

import importlib

from tpu_plugin import envs

# architecture name (config.json "architectures") -> "module:Class" of the flax nnx port
_JAX_MODELS: dict[str, str] = {
    "DeepseekV3ForCausalLM": "tpu_plugin.models.deepseek_v3:DeepseekV3ForCausalLM",
    "Gemma3ForCausalLM": "tpu_plugin.models.gemma3:Gemma3ForCausalLM",
    "LlamaForCausalLM": "tpu_plugin.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "tpu_plugin.models.mistral:MistralForCausalLM",
    "MixtralForCausalLM": "tpu_plugin.models.mixtral:MixtralForCausalLM",
    "Phi3ForCausalLM": "tpu_plugin.models.phi3:Phi3ForCausalLM",
    "Qwen2ForCausalLM": "tpu_plugin.models.llama:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "tpu_plugin.models.qwen3:Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM": "tpu_plugin.models.qwen3_moe:Qwen3MoeForCausalLM",
    # Pooling models (--runner pooling; tpu_plugin/runner/pooling.py). Decoder embedding
    # checkpoints saved from the base model ("LlamaModel": no lm_head, no "model." prefix) use
    # the decoder ports; the BERT family is an encoder port.
    "BertModel": "tpu_plugin.models.bert:BertModel",
    "LlamaModel": "tpu_plugin.models.llama:LlamaForCausalLM",
    "MistralModel": "tpu_plugin.models.mistral:MistralForCausalLM",
    "Qwen2Model": "tpu_plugin.models.llama:Qwen2ForCausalLM",
    "RobertaModel": "tpu_plugin.models.bert:RobertaModel",
    "XLMRobertaModel": "tpu_plugin.models.bert:RobertaModel",
}


def supported_architectures() -> list[str]:
    """The architectures with a native JAX port, sorted."""
    return sorted(_JAX_MODELS)


class UnsupportedModelError(ValueError):
    """The model cannot run on this plugin; the message names the fix."""


def _torchax_blocker(arch: str) -> str | None:
    """Why vLLM's own PyTorch class for ``arch`` cannot run through torchax (None: it can)."""
    from vllm.model_executor.models import ModelRegistry

    if arch not in ModelRegistry.get_supported_archs():
        return "vLLM has no model class for it either"
    info = ModelRegistry._try_inspect_model_cls(arch)
    if info is None:
        return "vLLM cannot import its model class"
    if not info.is_text_generation_model:
        return "it is not a text-generation model"
    if info.supports_multimodal:
        return "multimodal inputs are not supported on the torchax path"
    if info.is_attention_free or info.is_hybrid:
        return "its state-space (Mamba-style) layers need a KV cache kind the runner lacks"
    return None


def select_implementation(architectures: list[str]) -> tuple[str, str]:
    """``(impl, architecture)``: ``impl`` is ``"jax"`` (native port) or ``"torchax"``.

    ``TPU_PLUGIN_MODEL_IMPL=auto`` takes the JAX port when there is one and vLLM's PyTorch
    class through torchax otherwise; ``jax`` and ``torchax`` force one path. Raises, naming
    the reason and the fix, when no path can run the model.
    """
    impl = envs.model_impl()
    names = ", ".join(architectures) or "this model"
    native = [a for a in architectures if a in _JAX_MODELS]
    if impl in ("auto", "jax") and native:
        return "jax", native[0]
    if impl == "jax":
        raise UnsupportedModelError(
            f"{names} has no JAX port in tpu-plugin (TPU_PLUGIN_MODEL_IMPL=jax); supported: "
            f"{', '.join(supported_architectures())}; set TPU_PLUGIN_MODEL_IMPL=torchax or auto "
            "to run vLLM's PyTorch model through torchax"
        )
    reasons = []
    for arch in architectures:
        blocker = _torchax_blocker(arch)
        if blocker is None:
            return "torchax", arch
        reasons.append(f"{arch}: {blocker}")
    raise UnsupportedModelError(
        f"{names} has no JAX port in tpu-plugin (supported: "
        f"{', '.join(supported_architectures())}) and cannot run through torchax ("
        + "; ".join(reasons or ["no architecture in config.json"])
        + "); use a supported architecture"
    )


def check_architecture(architectures: list[str]) -> str:
    """Returns the architecture this plugin will run, or raises naming why none can run."""
    return select_implementation(architectures)[1]


def resolve_model_class(architectures: list[str]) -> type:
    """The flax nnx class of the model's JAX port (whatever ``TPU_PLUGIN_MODEL_IMPL`` says)."""
    native = [a for a in architectures if a in _JAX_MODELS]
    if not native:
        raise UnsupportedModelError(f"{', '.join(architectures)} has no JAX port in tpu-plugin")
    module_name, class_name = _JAX_MODELS[native[0]].split(":")
    return getattr(importlib.import_module(module_name), class_name)
