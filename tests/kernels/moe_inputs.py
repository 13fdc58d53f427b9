"""Random fused-MoE problems for the kernel tests, with controlled expert loads.

Each problem draws fresh inputs from a key seeded by its parameters (so cases never share
numbers). Loads:

- ``random``: softmax top-k of random logits (k distinct experts per token).
- ``first_k``: every token picks experts ``0 .. k-1``; the other experts get no token.
- ``one_expert``: every assignment goes to one expert (duplicates within a token when k > 1).
- ``skewed``: ids drawn from a steep distribution (most rows on a few experts, some empty).
- ``dropped``: random ids with about a quarter replaced by ``-1`` or ``E`` (contribute nothing).
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

LOADS = ("random", "first_k", "one_expert", "skewed", "dropped")


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


@dataclasses.dataclass
class MoeProblem:
    x: jax.Array
    weights: jax.Array
    expert_ids: jax.Array
    w_gate_up: jax.Array
    w_down: jax.Array

    def args(self):
        return self.x, self.weights, self.expert_ids, self.w_gate_up, self.w_down


def make_problem(
    seed: int,
    *,
    tokens: int,
    hidden: int,
    inter: int,
    experts: int,
    top_k: int,
    dtype=jnp.float32,
    load: str = "random",
) -> MoeProblem:
    # NumPy draws: no JAX op compiles per shape, so making a problem costs nothing.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, hidden), np.float32)
    # Scaled so activations stay O(1) through both projections.
    w_gate_up = rng.standard_normal((experts, 2 * inter, hidden), np.float32) / hidden**0.5
    w_down = rng.standard_normal((experts, hidden, inter), np.float32) / inter**0.5
    logits = rng.standard_normal((tokens, experts))
    ids = np.argsort(-logits, axis=1)[:, :top_k]
    weights = np.exp(np.take_along_axis(logits, ids, 1))
    weights /= weights.sum(axis=1, keepdims=True)
    if load == "first_k":
        ids = np.broadcast_to(np.arange(top_k), (tokens, top_k))
    elif load == "one_expert":
        ids = np.full((tokens, top_k), rng.integers(experts))
    elif load == "skewed":
        p = 0.5 ** np.arange(experts)
        p[rng.integers(experts)] = 0.0  # at least one expert gets nothing
        ids = rng.choice(experts, (tokens, top_k), p=p / p.sum())
    elif load == "dropped":
        drop = rng.random((tokens, top_k)) < 0.25
        ids = np.where(drop, rng.choice([-1, experts], drop.shape), ids)
    elif load != "random":
        raise ValueError(load)
    if load != "random":
        weights = rng.uniform(0.1, 1.0, (tokens, top_k))
    return MoeProblem(
        jnp.asarray(x, dtype),
        jnp.asarray(weights, jnp.float32),
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(w_gate_up, dtype),
        jnp.asarray(w_down, dtype),
    )


def rel_err(got: jax.Array, want: jax.Array) -> float:
    """max |got - want| / max |want|, in float64."""
    got = np.asarray(got.astype(jnp.float32), np.float64)
    want = np.asarray(want.astype(jnp.float32), np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def tol_of(dtype) -> float:
    return 1e-5 if jnp.dtype(dtype) == jnp.float32 else 1e-2
