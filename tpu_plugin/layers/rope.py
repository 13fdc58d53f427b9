"""Rotary position embedding (the "rotate half" layout Hugging Face's Llama family uses).

The inverse frequencies come from transformers' own ``ROPE_INIT_FUNCTIONS`` for scaled variants
(llama3, yarn, linear, …), so every scaling rule matches the reference implementation exactly;
only the default rule is computed here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_POSITION_DEPENDENT = ("dynamic", "longrope")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The config's rope parameters as one dict (transformers 5 ``rope_parameters``)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return dict(params)


def rope_frequencies(hf_config: Any, head_dim: int) -> tuple[np.ndarray, float]:
    """``(inv_freq [head_dim // 2], attention_scaling)`` for the config's rope type."""
    params = rope_parameters(hf_config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
        return (1.0 / (params["rope_theta"] ** exponents)).astype(np.float32), 1.0
    if rope_type in _POSITION_DEPENDENT:
        raise ValueError(
            f"rope_type {rope_type!r} depends on the sequence length and is not supported yet"
        )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope_type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv_freq.float().numpy(), float(scaling)


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scaling: float = 1.0
) -> jax.Array:
    """Rotates ``x`` (``[tokens, heads, head_dim]``) by each token's position."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = (jnp.cos(angles) * scaling)[:, None, :]
    sin = (jnp.sin(angles) * scaling)[:, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
