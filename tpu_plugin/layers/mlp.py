"""The gated feed-forward block every dense family here uses: ``down(act(gate(x)) * up(x))``.

Families differ only in the activation (SiLU for Llama/Qwen/Mistral/Phi-3, tanh-approximated
GELU for Gemma), named as in the Hugging Face config (``hidden_act`` / ``hidden_activation``).
Gate and up run as one matmul, ``gate_up_proj`` with weight ``[intermediate, 2, hidden]`` (row
``i`` of gate next to row ``i`` of up, :class:`~tpu_plugin.layers.linear.Fusion`): tensor
parallelism splits axis 0, so every device holds the same rows of both and computes
``act(gate) * up`` on its own. The loader interleaves the checkpoint's ``gate_proj``/``up_proj``
(or cuts Phi-3's concatenated ``gate_up_proj`` first), so one module serves both checkpoint
layouts.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tpu_plugin.layers.linear import FusedLinear, Fusion, Linear

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
    """``down(act(gate(x)) * up(x))``: ``gate_up_proj`` (fused) and ``down_proj``."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        dtype: jnp.dtype,
        bias: bool = False,
        act: str = "silu",
    ):
        # row i of gate next to row i of up: TP splits rows of both alike (Fusion)
        fusion = Fusion((("gate_proj", intermediate), ("up_proj", intermediate)), intermediate)
        self.gate_up_proj = FusedLinear(hidden, fusion, dtype, bias=bias)
        self.down_proj = Linear(intermediate, hidden, dtype, bias=bias)
        activation(act)  # fail at construction (start-up), not at the first step
        self.act = act  # a name, not a function: static module data must be hashable

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = self.gate_up_proj.parts(x)
        return self.down_proj(activation(self.act)(gate) * up)
