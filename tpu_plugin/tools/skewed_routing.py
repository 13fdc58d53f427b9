"""A declared, parameterised MoE routing skew for experiments on random weights.

Random router weights spread tokens almost uniformly over the experts, which no expert cache
or predictor can beat; real models do not (MoE-Infinity reports per-request expert affinity
with a heavy-tailed, Zipf-like shape). This replaces a model's router logits, through
:func:`tpu_plugin.layers.moe_offload.overridden_router`, by a per-request affinity:

- each request ``r`` and MoE layer ``l`` get a random ranking of the experts, and expert of
  rank ``i`` (from 1) probability ``p_rl(e) ~ 1 / i^skew`` (``skew`` 0: uniform);
- a token's logits are ``log p_rl + Gumbel noise`` (a fresh draw per token, layer and
  position), so the model's own top-k draws its ``k`` experts without replacement from
  ``p_rl``; the weights follow from the model's own normalisation.

Used by ``benchmarks/bench_moe_offload.py`` and the offload tests; never while serving.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def zipf_affinity(seed: int, requests: int, layers: int, experts: int, skew: float) -> np.ndarray:
    """``[requests, layers, experts]`` float32 log-probabilities of the Zipf affinity."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, experts + 1, dtype=np.float64) ** skew
    probs = weights / weights.sum()
    out = np.empty((requests, layers, experts), np.float32)
    for r in range(requests):
        for layer in range(layers):
            out[r, layer, rng.permutation(experts)] = np.log(probs)
    return out


def expected_distinct(skew: float, experts: int, top_k: int, draws: int = 2000) -> float:
    """Mean distinct experts a request touches per layer in ``top_k``-draws, a measure of the
    skew's strength (``top_k`` is the floor, ``experts`` the ceiling), by sampling."""
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, experts + 1, dtype=np.float64) ** skew
    probs = weights / weights.sum()
    seen = np.zeros(experts, bool)
    for _ in range(draws):
        seen[rng.choice(experts, top_k, replace=False, p=probs)] = True
    return float(seen.sum())


def router(
    affinity: jax.Array, token_request: jax.Array, positions: jax.Array, seed: int = 0
) -> Callable[[int, jax.Array], jax.Array]:
    """The override for one step: token ``t`` belongs to request ``token_request[t]`` (rows
    of ``affinity``) at ``positions[t]``; the model's logits are ignored."""
    base = jax.random.key(seed)

    def logits_for(layer: int, logits: jax.Array) -> jax.Array:
        key = jax.random.fold_in(base, layer)
        per_token = jax.vmap(lambda r, p: jax.random.fold_in(jax.random.fold_in(key, r), p))(
            token_request, positions
        )
        noise = jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],)))(per_token)
        request = jnp.clip(token_request, 0, affinity.shape[0] - 1)
        return affinity[request, layer] + noise

    return logits_for
