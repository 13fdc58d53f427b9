"""RMS and layer normalisation, computed in float32 whatever the activation dtype (as HF does)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, weight_offset: float = 0.0) -> jax.Array:
    """``x / rms(x) * weight`` over the last axis, as Hugging Face computes it.

    The statistic is float32 whatever the dtype. The plain form (Llama, Qwen, Mistral, Phi-3,
    DeepSeek) rounds the normalised ``x`` to its dtype and multiplies by the weight there, as
    HF's ``LlamaRMSNorm`` does; Gemma's ``(1 + weight)`` form (``weight_offset=1.0``) scales
    in float32 before rounding, as HF's ``Gemma3RMSNorm`` does. ``weight`` broadcasts against
    ``x`` (a per-head weight can differ per head).
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight_offset:
        return (normed * (weight.astype(jnp.float32) + weight_offset)).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nnx.Module):
    """``x / rms(x) * weight``; ``weight_offset=1.0`` gives Gemma's ``(1 + weight)`` form.

    :meth:`add_and_norm` is the residual add of a block and the norm after it as one function
    returning both, so that XLA emits them as one fusion (the sum is written once, for the next
    block's residual, and normalised in the same pass); decoder layers carry the residual
    stream through it instead of adding it themselves.
    """

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype, weight_offset: float = 0.0):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps
        self.weight_offset = weight_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps, self.weight_offset)

    def add_and_norm(self, x: jax.Array, residual: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """``(norm(x + residual), x + residual)``; ``residual`` None (the first layer, where
        the stream starts at the embeddings): ``(norm(x), x)``."""
        summed = x if residual is None else x + residual
        return self(summed), summed


class LayerNorm(nnx.Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` (BERT-style encoders), in float32."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        out = normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(x.dtype)
