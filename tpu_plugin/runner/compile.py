"""Shapes XLA compiles for, and the persistent compilation cache.

Every step is padded up to a bucket so a serving run compiles a handful of programs, not one
per batch shape: tokens and sequences round up to powers of two, and the width of the page
table to the power of two of the longest sequence's pages, capped by the model's maximum length.
There is no floor above 1: padding a batch-1 decode to 16 tokens made every matmul 16x wider and
halved batch-1 throughput on CPU (measured, benchmarks/NOTES_cpu_offline.md).
"""

from __future__ import annotations

import jax
from vllm.logger import init_logger

from tpu_plugin import envs

logger = init_logger(__name__)

MIN_TOKEN_BUCKET = 1
MIN_SEQ_BUCKET = 1


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def token_bucket(num_tokens: int) -> int:
    return max(MIN_TOKEN_BUCKET, next_power_of_two(num_tokens))


def seq_bucket(num_seqs: int, max_num_seqs: int) -> int:
    return min(max(MIN_SEQ_BUCKET, next_power_of_two(num_seqs)), max(max_num_seqs, num_seqs))


def page_bucket(num_pages: int, max_pages: int) -> int:
    return min(next_power_of_two(max(1, num_pages)), max_pages)


def enable_persistent_cache() -> None:
    """Points JAX's compilation cache at ``TPU_PLUGIN_COMPILE_CACHE`` (unless "off")."""
    cache_dir = envs.compile_cache_dir()
    if cache_dir is None:
        return
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Cache every program: a step of a small model compiles in seconds but is worth keeping.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logger.info("JAX compilation cache: %s", cache_dir)
