"""Fused MoE as Mosaic TPU Pallas grouped matmuls over all experts (numbers as ``reference.py``).

Two ``pallas_call``s serve every expert at once, no per-expert Python loop:

1. **Routing layout (XLA, cheap).** The ``T * k`` assignments are stably sorted by expert and
   each expert's group of rows is padded to a multiple of the row tile ``tm``, so every row tile
   belongs to exactly one expert. Experts with no tokens get no tile. The padded row array is a
   gather of ``x`` (padding rows are zeros). Two small arrays are scalar-prefetched into SMEM:
   ``tile_expert`` (row tile -> expert id) and ``num_used`` (tiles that hold rows). The row count
   is static: ``cdiv(T*k + min(E, T*k) * (tm - 1), tm)`` tiles bound any routing.
2. **gate_up + activation.** Grid ``(row tiles, I / tn, H / tk)``. The BlockSpec ``index_map``s
   read ``tile_expert`` to pick the expert's ``[tn, tk]`` gate block (rows ``j*tn`` of
   ``w_gate_up[e]``) and up block (rows ``I + j*tn``), so only chosen experts' weights are ever
   fetched. Gate and up accumulate in float32 VMEM scratch over the ``tk`` steps; the last step
   writes ``act(gate) * up`` in the weights' dtype.
3. **down.** Grid ``(row tiles, H / tn, I / tk)`` over the intermediate rows with
   ``w_down[e]``'s ``[tn, tk]`` blocks, float32 accumulation, float32 output rows.
4. **Combine (XLA).** Each token gathers its k result rows and sums them weighted, in float32.

Tiles past ``num_used`` (the static bound is rarely reached) skip the matmuls and write zeros;
their ``index_map``s repeat the last real tile's blocks, so the pipeline fetches nothing new for
them. Weights stay in the Hugging Face ``[out, in]`` layout (the kernels contract the last axis
of both operands), so serving needs no transposed copy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..tiling import min_row_tile, pick_block
from .reference import activate, check_activation, check_shapes, precision_of
from .xla import combine_choices, gather_padded_rows, routing_layout

DEFAULT_BLOCK_M = 128
# Preferred column (output) and contraction tiles: the largest that divides the dimension, else
# the whole dimension (Mosaic accepts a block equal to the full array dimension).
BLOCK_N_CHOICES = (512, 256, 128)
BLOCK_K_CHOICES = (1024, 512, 256, 128)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(x: int, m: int) -> int:
    return _cdiv(x, m) * m


__all__ = ["fused_moe", "routing_layout"]


def _nt_dot(a: jax.Array, b: jax.Array, precision) -> jax.Array:
    """``a @ b.T`` with float32 accumulation (``b`` in ``[out, in]`` layout)."""
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _gate_up_kernel(
    tile_expert_ref,  # SMEM [num_tiles]
    num_used_ref,  # SMEM [1]
    x_ref,  # VMEM [tm, tk]
    gate_ref,  # VMEM [1, tn, tk]
    up_ref,  # VMEM [1, tn, tk]
    out_ref,  # VMEM [tm, tn]
    gate_acc,  # VMEM f32 [tm, tn]
    up_acc,  # VMEM f32 [tm, tn]
    *,
    activation: str,
    precision,
):
    del tile_expert_ref
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        gate_acc[...] = jnp.zeros_like(gate_acc)
        up_acc[...] = jnp.zeros_like(up_acc)

    @pl.when(pl.program_id(0) < num_used_ref[0])
    def _accumulate():
        x = x_ref[...]
        gate_acc[...] += _nt_dot(x, gate_ref[0], precision)
        up_acc[...] += _nt_dot(x, up_ref[0], precision)

    @pl.when(kk == pl.num_programs(2) - 1)
    def _finish():  # unused tiles: act(0) * 0 == 0
        out_ref[...] = (activate(gate_acc[...], activation) * up_acc[...]).astype(out_ref.dtype)


def _down_kernel(
    tile_expert_ref,  # SMEM [num_tiles]
    num_used_ref,  # SMEM [1]
    h_ref,  # VMEM [tm, tk]
    w_ref,  # VMEM [1, tn, tk]
    out_ref,  # VMEM f32 [tm, tn]
    acc,  # VMEM f32 [tm, tn]
    *,
    precision,
):
    del tile_expert_ref
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc[...] = jnp.zeros_like(acc)

    @pl.when(pl.program_id(0) < num_used_ref[0])
    def _accumulate():
        acc[...] += _nt_dot(h_ref[...], w_ref[0], precision)

    @pl.when(kk == pl.num_programs(2) - 1)
    def _finish():
        out_ref[...] = acc[...].astype(out_ref.dtype)


def _grid_maps(num_n: int, num_k: int, n_offset: int = 0):
    """``index_map``s for rows, weights and output; unused tiles repeat the last real step's
    blocks (so nothing new is fetched for them) but write their own (zero) output block."""

    def last_real(i, num_used_ref):
        return i >= num_used_ref[0], jnp.maximum(jnp.minimum(i, num_used_ref[0] - 1), 0)

    def rows_map(i, j, kk, tile_expert_ref, num_used_ref):
        unused, row = last_real(i, num_used_ref)
        return row, jnp.where(unused, num_k - 1, kk)

    def weight_map(i, j, kk, tile_expert_ref, num_used_ref):
        unused, _ = last_real(i, num_used_ref)
        jj = jnp.where(unused, num_n - 1, j)
        return tile_expert_ref[i], n_offset + jj, jnp.where(unused, num_k - 1, kk)

    def out_map(i, j, kk, tile_expert_ref, num_used_ref):
        return i, j

    return rows_map, weight_map, out_map


@functools.partial(
    jax.jit,
    static_argnames=(
        "activation",
        "block_m",
        "block_n",
        "block_k",
        "vmem_limit_bytes",
        "interpret",
    ),
)
def fused_moe(
    x: jax.Array,
    weights: jax.Array,
    expert_ids: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    *,
    activation: str = "silu",
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """``[T, H]`` in ``x.dtype``; arguments and numbers as ``reference.fused_moe``.

    - ``block_m``: rows per tile (default 128, shrunk to the assignments for small batches;
      rounded up to the dtype's native tile of 8/16/32 rows).
    - ``block_n`` / ``block_k``: output-column / contraction tiles of both kernels (default: the
      largest of 512/256/128 resp. 1024..128 that divides the dimension, else all of it); an
      explicit value must divide ``I`` and ``H``.
    - ``interpret``: ``True`` (or a ``pltpu.InterpretParams``) runs in TPU interpret mode on CPU.
    """
    check_activation(activation)
    num_tokens, hidden, top_k, num_experts, inter = check_shapes(
        x, weights, expert_ids, w_gate_up, w_down
    )
    if interpret is True:
        interpret = pltpu.InterpretParams()
    sublanes = max(min_row_tile(x.dtype), min_row_tile(w_gate_up.dtype))
    if inter % min_row_tile(w_gate_up.dtype):
        raise ValueError(
            f"the TPU kernel needs the expert intermediate size {inter} to be a multiple of "
            f"{min_row_tile(w_gate_up.dtype)}; use tpu_kernels.fused_moe.xla instead"
        )
    m = num_tokens * top_k
    tm = _round_up(min(block_m or DEFAULT_BLOCK_M, _round_up(m, sublanes)), sublanes)
    precision = precision_of(x.dtype)
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=vmem_limit_bytes,
    )
    row_token, assignment_row, tile_expert, num_used = routing_layout(expert_ids, num_experts, tm)
    num_tiles = tile_expert.shape[0]
    padded_rows = num_tiles * tm
    rows = gather_padded_rows(x, row_token)  # [P, H]

    # Kernel 1: [P, H] x w_gate_up[e] -> act(gate) * up, [P, I].
    tn = pick_block(inter, block_n, BLOCK_N_CHOICES, "block_n")
    tk = pick_block(hidden, block_k, BLOCK_K_CHOICES, "block_k")
    num_n, num_k = inter // tn, hidden // tk
    rows_map, gate_map, out_map = _grid_maps(num_n, num_k)
    _, up_map, _ = _grid_maps(num_n, num_k, n_offset=num_n)
    act_dtype = w_down.dtype
    hidden_rows = pl.pallas_call(
        functools.partial(_gate_up_kernel, activation=activation, precision=precision),
        out_shape=jax.ShapeDtypeStruct((padded_rows, inter), act_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(num_tiles, num_n, num_k),
            in_specs=[
                pl.BlockSpec((tm, tk), rows_map),
                pl.BlockSpec((1, tn, tk), gate_map),
                pl.BlockSpec((1, tn, tk), up_map),
            ],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32), pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=params,
        cost_estimate=pl.CostEstimate(
            flops=4 * padded_rows * hidden * inter,
            transcendentals=padded_rows * inter,
            bytes_accessed=rows.size * rows.dtype.itemsize
            + w_gate_up.size * w_gate_up.dtype.itemsize
            + padded_rows * inter * jnp.dtype(act_dtype).itemsize,
        ),
        interpret=interpret or False,
        name="fused_moe_gate_up",
    )(tile_expert, num_used, rows, w_gate_up, w_gate_up)

    # Kernel 2: [P, I] x w_down[e] -> [P, H] float32.
    tn = pick_block(hidden, block_n, BLOCK_N_CHOICES, "block_n")
    tk = pick_block(inter, block_k, BLOCK_K_CHOICES, "block_k")
    num_n, num_k = hidden // tn, inter // tk
    rows_map, w_map, out_map = _grid_maps(num_n, num_k)
    down_rows = pl.pallas_call(
        functools.partial(_down_kernel, precision=precision),
        out_shape=jax.ShapeDtypeStruct((padded_rows, hidden), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(num_tiles, num_n, num_k),
            in_specs=[pl.BlockSpec((tm, tk), rows_map), pl.BlockSpec((1, tn, tk), w_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=params,
        cost_estimate=pl.CostEstimate(
            flops=2 * padded_rows * hidden * inter,
            transcendentals=0,
            bytes_accessed=padded_rows * inter * jnp.dtype(act_dtype).itemsize
            + w_down.size * w_down.dtype.itemsize
            + padded_rows * hidden * 4,
        ),
        interpret=interpret or False,
        name="fused_moe_down",
    )(tile_expert, num_used, hidden_rows, w_down)

    # Combine: each token's k rows (dropped assignments read as zeros), weighted, in float32.
    per_choice = jnp.take(down_rows, assignment_row, axis=0, mode="fill", fill_value=0.0)
    return combine_choices(per_choice, weights, x.dtype)
