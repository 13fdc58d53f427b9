"""Runner steps built by hand, for code that drives a model's forward without the engine.

The torchax tests and ``benchmarks/bench_torchax_step.py`` call forwards with the runner's
contract ``(params, kv_caches, step) -> (kv_caches, logits)`` directly, so that a difference
points at the model rather than at scheduling. They need the same three pieces, kept here once:
a ragged step in the runner's ``StepInputs`` layout, empty paged KV caches, and the native flax
port wrapped in that contract.

Each sequence ``i`` owns pages ``i * pages_per_seq ..`` of the cache, and the token count is
padded to the runner's bucket (``token_bucket``) with writes to a slot past the cache, as the
runner does, so these steps compile to the programs the engine would run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PAGE_SIZE = 16


def ragged_step(
    tokens: list[list[int]],
    starts: list[int],
    pages_per_seq: int,
    num_pages: int,
    page_size: int = PAGE_SIZE,
):
    """One step in which sequence ``i`` adds ``tokens[i]`` at positions ``starts[i]`` onward."""
    from tpu_plugin.layers.attention import AttentionMetadata
    from tpu_plugin.runner.compile import token_bucket
    from tpu_plugin.runner.inputs import StepInputs

    lens = [len(t) for t in tokens]
    padded = token_bucket(sum(lens))
    ids = np.zeros(padded, np.int32)
    positions = np.zeros(padded, np.int32)
    slots = np.full(padded, num_pages * page_size, np.int32)  # padding writes past the cache
    offset = 0
    for i, (seq, start) in enumerate(zip(tokens, starts, strict=True)):
        n = len(seq)
        pos = np.arange(start, start + n)
        ids[offset : offset + n] = seq
        positions[offset : offset + n] = pos
        page = i * pages_per_seq + pos // page_size
        slots[offset : offset + n] = page * page_size + pos % page_size
        offset += n
    cu = np.cumsum(lens)
    num_seqs = len(tokens)
    return StepInputs(
        input_ids=jnp.asarray(ids),
        positions=jnp.asarray(positions),
        attention=AttentionMetadata(
            slot_mapping=jnp.asarray(slots),
            kv_lens=jnp.asarray(np.asarray(starts) + np.asarray(lens), jnp.int32),
            page_indices=jnp.arange(num_seqs * pages_per_seq, dtype=jnp.int32).reshape(
                num_seqs, -1
            ),
            query_start_loc=jnp.asarray(np.concatenate([[0], cu]), jnp.int32),
            num_seqs=jnp.asarray([num_seqs], jnp.int32),
        ),
        logits_indices=jnp.asarray(cu - 1, jnp.int32),
    )


def empty_kv_caches(
    dims: tuple[int, int, int], num_pages: int, page_size: int = PAGE_SIZE, dtype=jnp.float32
) -> list[tuple[jax.Array, jax.Array]]:
    """Zeroed ``(key, value)`` pages per layer for ``dims = (layers, kv_heads, head_dim)``."""
    num_layers, kv_heads, head_dim = dims
    shape = (num_pages, page_size, kv_heads, head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)]


def native_forward(model: Any) -> tuple[Callable, Any]:
    """``(forward, params)`` of a loaded flax port: the runner's forward without sharding."""
    from flax import nnx

    graphdef, params = nnx.split(model)

    def forward(params: Any, kv_caches: list, step: Any) -> tuple[list, jax.Array]:
        model = nnx.merge(graphdef, params)
        kv_caches, hidden = model(kv_caches, step.input_ids, step.positions, step.attention)
        return kv_caches, model.compute_logits(hidden[step.logits_indices])

    return forward, params
