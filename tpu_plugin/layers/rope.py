"""Rotary position embedding (the "rotate half" layout Hugging Face's decoder families use).

The inverse frequencies come from transformers' own ``ROPE_INIT_FUNCTIONS`` for scaled variants
(llama3, yarn, linear, …), so every scaling rule matches the reference implementation exactly;
only the default rule is computed here. Two generalisations cover the families ported so far:

* partial rotary (Phi-3/Phi-4-mini ``partial_rotary_factor``): only the first
  ``2 * len(inv_freq)`` features of each head rotate, the rest pass through unchanged;
* per-layer-type parameters (Gemma 3): ``rope_parameters`` may be a dict keyed by layer type
  (``"sliding_attention"``, ``"full_attention"``), each with its own theta and scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_POSITION_DEPENDENT = ("dynamic", "longrope")


def _is_per_layer_type(params: dict[str, Any], layer_type: str | None) -> bool:
    return layer_type is not None and isinstance(params.get(layer_type), dict)


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope parameters (transformers 5 ``rope_parameters``) that apply to ``layer_type``."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if _is_per_layer_type(params, layer_type):
        return dict(params[layer_type])
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return dict(params)


def rope_frequencies(
    hf_config: Any, head_dim: int, layer_type: str | None = None
) -> tuple[np.ndarray, float]:
    """``(inv_freq [rotary_dim // 2], attention_scaling)`` for the config's rope type."""
    params = rope_parameters(hf_config, layer_type)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
        return (1.0 / (params["rope_theta"] ** exponents)).astype(np.float32), 1.0
    if rope_type in _POSITION_DEPENDENT:
        raise ValueError(
            f"rope_type {rope_type!r} depends on the sequence length and is not supported yet; "
            "supported: default, linear, llama3, yarn"
        )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope_type {rope_type!r}")
    # transformers reads the nested dict itself when given the layer type; a flat dict must not
    # be indexed by layer type, so the argument is passed only for nested parameters.
    all_params = getattr(hf_config, "rope_parameters", None) or {}
    kwargs = {"layer_type": layer_type} if _is_per_layer_type(all_params, layer_type) else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu", **kwargs)
    return inv_freq.float().numpy(), float(scaling)


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scaling: float = 1.0
) -> jax.Array:
    """Rotates ``x`` (``[tokens, heads, head_dim]``) by each token's position.

    The first ``2 * len(inv_freq)`` features rotate; any remaining ones (partial rotary) are
    returned unchanged.
    """
    rotary_dim = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = (jnp.cos(angles) * scaling)[:, None, :]
    sin = (jnp.sin(angles) * scaling)[:, None, :]
    x32 = x.astype(jnp.float32)
    half = rotary_dim // 2
    x1, x2, rest = x32[..., :half], x32[..., half:rotary_dim], x32[..., rotary_dim:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)


@dataclass(frozen=True)
class RotaryEmbedding:
    """One layer's rotary embedding: a constant of the architecture, not a weight.

    Frozen and made of plain floats so it can sit on an nnx module as static (hashable) data,
    and layers of the same type share equal instances.
    """

    inv_freq: tuple[float, ...]
    scaling: float = 1.0

    @classmethod
    def from_config(
        cls, hf_config: Any, head_dim: int, layer_type: str | None = None
    ) -> RotaryEmbedding:
        inv_freq, scaling = rope_frequencies(hf_config, head_dim, layer_type)
        return cls(tuple(float(f) for f in inv_freq), scaling)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return apply_rope(x, positions, jnp.asarray(self.inv_freq, jnp.float32), self.scaling)
