"""The fused MoE specification in plain jnp: every expert applied densely, one at a time.

This is deliberately the most obvious computation (each expert runs on *all* tokens and a
per-token combine weight zeroes the tokens it was not chosen for), so it can serve as the oracle
that ``xla.py`` and ``tpu.py`` are tested against. It costs ``E / k`` times the real work: use it
for tests, never for serving.

Numerics (shared by every implementation): matmuls take the inputs' dtype and accumulate in
float32 (``Precision.HIGHEST`` for float32 inputs, so TPUs do not drop to bf16 passes); the
activation runs in float32; the gated intermediate is rounded to ``w_down.dtype`` before the down
projection; the weighted sum over the k experts is float32; the result is cast to ``x.dtype``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activate(gate: jax.Array, activation: str) -> jax.Array:
    """The gate's activation in float32 (HF ``ACT2FN`` names: silu, gelu = erf, tanh approx)."""
    gate = gate.astype(jnp.float32)
    if activation == "silu":
        return gate * jax.nn.sigmoid(gate)
    if activation == "gelu":
        return 0.5 * gate * (1.0 + lax.erf(gate * jnp.float32(1.0 / math.sqrt(2.0))))
    if activation == "gelu_pytorch_tanh":
        c = jnp.float32(math.sqrt(2.0 / math.pi))
        return 0.5 * gate * (1.0 + jnp.tanh(c * (gate + 0.044715 * gate * gate * gate)))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def gated_mlp(
    rows: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, activation: str, precision
) -> jax.Array:
    """``[..., T, H]`` rows through one expert's gated MLP per leading index, float32 out.

    ``w_gate_up`` ``[..., 2I, H]`` and ``w_down`` ``[..., H, I]`` carry the same leading axes as
    ``rows`` (none for one expert, a tile axis for ``xla``'s batched tiles), so every
    implementation that runs plain matmuls shares these numbers: float32 accumulation, the
    activation in float32, the intermediate rounded to ``w_down.dtype``.
    """
    gate_up = jnp.einsum(
        "...th,...nh->...tn",
        rows,
        w_gate_up,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    return jnp.einsum(
        "...ti,...hi->...th",
        gate_times_up(gate_up, activation).astype(w_down.dtype),
        w_down,
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def gate_times_up(gate_up: jax.Array, activation: str) -> jax.Array:
    """``act(gate) * up`` in float32 from a ``[..., 2I]`` gate_up projection (gate first)."""
    inter = gate_up.shape[-1] // 2
    return activate(gate_up[..., :inter], activation) * gate_up[..., inter:]


def precision_of(dtype) -> lax.Precision | None:
    """Full float32 matmuls for float32 inputs; the MXU's native path for narrower ones."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def check_shapes(x, weights, expert_ids, w_gate_up, w_down) -> tuple[int, int, int, int, int]:
    """Validates the shared layout; returns (T, H, k, E, I)."""
    num_tokens, hidden = x.shape
    if weights.shape != expert_ids.shape or weights.shape[0] != num_tokens:
        raise ValueError(
            f"weights {weights.shape} and expert_ids {expert_ids.shape} must both be "
            f"[T={num_tokens}, k]"
        )
    num_experts, two_i, hidden_w = w_gate_up.shape
    if hidden_w != hidden or two_i % 2:
        raise ValueError(f"w_gate_up must be [E, 2*I, H={hidden}], got {w_gate_up.shape}")
    inter = two_i // 2
    if w_down.shape != (num_experts, hidden, inter):
        raise ValueError(
            f"w_down must be [E={num_experts}, H={hidden}, I={inter}], got {w_down.shape}"
        )
    return num_tokens, hidden, weights.shape[1], num_experts, inter


def fused_moe(
    x: jax.Array,
    weights: jax.Array,
    expert_ids: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    *,
    activation: str = "silu",
) -> jax.Array:
    """``[T, H]``: each token's k chosen experts' gated MLPs, weighted and summed (the spec)."""
    check_activation(activation)
    num_experts = check_shapes(x, weights, expert_ids, w_gate_up, w_down)[3]
    precision = precision_of(x.dtype)
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(num_experts):
        # A token's weight for expert e (0 when not chosen; summed if chosen twice).
        combine = jnp.sum(jnp.where(expert_ids == e, weights.astype(jnp.float32), 0.0), axis=1)
        y = gated_mlp(x, w_gate_up[e], w_down[e], activation, precision)
        out = out + combine[:, None] * y
    return out.astype(x.dtype)
