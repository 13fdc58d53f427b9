"""Dense layers whose parameters keep Hugging Face's names and layouts.

``weight`` is stored as ``[out_features, in_features]`` exactly as in the checkpoint, so the
loader maps tensors to parameters by name alone; XLA contracts over the second axis directly,
with no transposed copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
    """``y = x @ weight.T (+ bias)``, plus the token's LoRA adapter where the runner attached
    adapter slots (``tpu_plugin.layers.lora``; ``None`` otherwise)."""

    lora: nnx.Module | None = None

    def __init__(self, in_features: int, out_features: int, dtype: jnp.dtype, bias: bool = False):
        self.weight = nnx.Param(jnp.zeros((out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.dot_general(x, self.weight[...], (((x.ndim - 1,), (1,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...]
        if self.lora is not None and (update := self.lora(x)) is not None:
            y = y + update
        return y


class Embedding(nnx.Module):
    """Token embedding; :meth:`attend` reuses it as the output head (tied embeddings)."""

    def __init__(self, vocab_size: int, dim: int, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.zeros((vocab_size, dim), dtype))

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], token_ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jax.lax.dot_general(
            x,
            self.weight[...],
            (((x.ndim - 1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
