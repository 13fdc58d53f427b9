"""RMS normalisation, computed in float32 whatever the activation dtype (as HF does)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """``x / rms(x) * weight``; ``weight_offset=1.0`` gives Gemma's ``(1 + weight)`` form."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype, weight_offset: float = 0.0):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps
        self.weight_offset = weight_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.weight[...].astype(jnp.float32) + self.weight_offset
        return (normed * scale).astype(x.dtype)
