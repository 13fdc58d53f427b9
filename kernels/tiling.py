"""Block-size arithmetic the Pallas TPU kernels share (fused MoE, quantized matmul)."""

from __future__ import annotations

import jax.numpy as jnp


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def min_row_tile(dtype) -> int:
    """Rows of one native TPU tile: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit values."""
    return 32 // jnp.dtype(dtype).itemsize


def pick_block(dim: int, requested: int | None, choices: tuple[int, ...], what: str) -> int:
    """``requested`` if it divides ``dim`` (else a ValueError naming ``what``), or the first of
    ``choices`` that divides it, or the whole ``dim``: blocks never straddle the array's end."""
    if requested is not None:
        if dim % requested:
            raise ValueError(f"{what}={requested} must divide the dimension {dim}")
        return requested
    return next((c for c in choices if dim % c == 0), dim)
