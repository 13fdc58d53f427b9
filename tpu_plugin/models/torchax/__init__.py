"""The torchax path: vLLM's PyTorch models on JAX, for architectures without a JAX port."""

from tpu_plugin.models.torchax.model import TorchaxModel, kv_cache_dims, load_torchax_model

__all__ = ["TorchaxModel", "kv_cache_dims", "load_torchax_model"]
