"""The gated feed-forward block every dense family here uses: ``down(act(gate(x)) * up(x))``.

Families differ only in the activation (SiLU for Llama/Qwen/Mistral/Phi-3, tanh-approximated
GELU for Gemma), named as in the Hugging Face config (``hidden_act`` / ``hidden_activation``).
Checkpoints that fuse gate and up into one tensor (Phi-3's ``gate_up_proj``) are split by the
loader (see ``fused_checkpoint_tensors`` in :mod:`tpu_plugin.models.llama`), so one module
serves both layouts.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tpu_plugin.layers.linear import Linear

# Hugging Face activation name -> function (transformers' ACT2FN names).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation named ``name``; an unknown name fails listing the known ones."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation {name!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]


class GatedMLP(nnx.Module):
    """``down(act(gate(x)) * up(x))`` with Hugging Face's parameter names."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        dtype: jnp.dtype,
        bias: bool = False,
        act: str = "silu",
    ):
        self.gate_proj = Linear(hidden, intermediate, dtype, bias=bias)
        self.up_proj = Linear(hidden, intermediate, dtype, bias=bias)
        self.down_proj = Linear(intermediate, hidden, dtype, bias=bias)
        activation(act)  # fail at construction (start-up), not at the first step
        self.act = act  # a name, not a function: static module data must be hashable

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))
