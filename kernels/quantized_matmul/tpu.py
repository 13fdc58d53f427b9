"""The quantized matmul as a Mosaic TPU Pallas kernel (numbers as ``reference.py``).

Grid ``(M / tm, N / tn, K / tk)``, the contraction innermost and "arbitrary", the others
"parallel" (megacore chips split them over both TensorCores). Each step's blocks are ordinary
VMEM ``BlockSpec`` blocks, double-buffered by Pallas, so the next weight block's copy runs
while the current one is multiplied:

- weight-only (W8A16): the ``[tn, tk]`` int8 / e4m3 weight block is cast to ``x``'s dtype in
  VMEM (exact) and multiplied on the MXU with float32 accumulation in a VMEM scratch; only the
  8-bit block crosses HBM. XLA on its own materializes the dequantized weight in HBM first
  (../shared/MEASURED.md: 0.8-1.2x the bf16 time instead of the 2x fewer bytes);
- W8A8 int8 (v5e, v6e, v5p: the MXU multiplies int8 natively): ``x`` is quantized per row
  before the call (XLA, a fused pass over ``M x K`` values), the int8 x int8 product
  accumulates in int32;
- W8A8 e4m3 where the MXU multiplies fp8 (TPU7x): e4m3 x e4m3 with float32 accumulation.

The last contraction step rescales the accumulated ``[tm, tn]`` block once, by the weight's
per-row scales (a ``[1, tn]`` block) and, for W8A8, the activations' per-row scales
(``[tm, 1]``). Decode (``M`` of 1-32) is bound by the weight's bytes: the defaults take large
weight blocks (up to ``1024 x 2048`` = 2 MiB int8) so each DMA is long against its issue cost.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..tiling import min_row_tile, pick_block, round_up
from .reference import check_arguments, precision_of, quantize_activations

BLOCK_M = 256
BLOCK_N_CHOICES = (1024, 512, 256, 128)
BLOCK_K_CHOICES = (2048, 1024, 512, 256, 128)
MIB = 1 << 20
# TPU generations whose MXU multiplies 8-bit operands natively (device kinds, lower case).
INT8_MXU = ("tpu v5 lite", "tpu v5e", "tpu v5", "tpu v5p", "tpu v6 lite", "tpu v6e", "v5e", "v6e")
FP8_MXU = ("tpu7x", "tpu 7x", "tpu v7", "tpu v7x", "v7x")


def device_kind() -> str:
    """The TPU being compiled for: the abstract mesh's (an ahead-of-time compile from a host
    without a TPU) or the default device's; ``""`` when neither is a TPU."""
    target = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if target is not None and target.platform == "tpu":
        return target.device_kind
    device = jax.devices()[0]
    return device.device_kind if device.platform == "tpu" else ""


def mxu_multiplies(activation_dtype, kind: str) -> bool:
    """Whether TPU ``kind``'s MXU multiplies 8-bit ``activation_dtype`` operands natively."""
    kind = kind.strip().lower()
    if jnp.dtype(activation_dtype) == jnp.int8:
        return kind in INT8_MXU
    return kind in FP8_MXU


def vmem_footprint(tm: int, tn: int, tk: int, x_dtype, w_dtype, w8a8: bool) -> int:
    """Bytes of VMEM one configuration plans for (double-buffered blocks, the cast weight
    block, the accumulator and the output block)."""
    x_item = 1 if w8a8 else jnp.dtype(x_dtype).itemsize
    w_item = jnp.dtype(w_dtype).itemsize
    cast = 0 if w8a8 else tn * tk * jnp.dtype(x_dtype).itemsize
    return (
        2 * tm * tk * x_item
        + 2 * tn * tk * w_item
        + cast
        + tm * tn * 4
        + 2 * tm * tn * jnp.dtype(x_dtype).itemsize
        + 2 * (tn + tm) * 4 * 8  # scale blocks (sublane padded)
    )


def _kernel(*refs, w8a8: bool, integer: bool, precision, num_k: int):
    if w8a8:
        x_ref, xs_ref, w_ref, ws_ref, o_ref, acc_ref = refs
    else:
        x_ref, w_ref, ws_ref, o_ref, acc_ref = refs
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = x_ref[...]
    w = w_ref[...] if w8a8 else w_ref[...].astype(x.dtype)  # dequantize in VMEM: a cast
    acc_ref[...] += lax.dot_general(
        x,
        w,
        (((1,), (1,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.int32 if integer else jnp.float32,
    )

    @pl.when(kk == num_k - 1)
    def _finish():
        out = acc_ref[...].astype(jnp.float32) * ws_ref[...]
        if w8a8:
            out = out * xs_ref[...]
        o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "activation_dtype",
        "block_m",
        "block_n",
        "block_k",
        "vmem_limit_bytes",
        "interpret",
    ),
)
def quantized_matmul(
    x: jax.Array,
    w: jax.Array,
    w_scale: jax.Array,
    *,
    activation_dtype=None,
    x_scale: jax.Array | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """``[M, N]`` in ``x.dtype``; arguments and numbers as ``reference.quantized_matmul``.

    - ``block_m``: rows per step (default 256, shrunk to ``M``, rounded to the native tile);
      ``block_n`` / ``block_k``: weight block (default: the largest of 1024..128 resp.
      2048..128 dividing ``N`` resp. ``K``, else all of it); explicit values must divide.
    - W8A8 (``activation_dtype``) needs an MXU that multiplies that type (int8: v5e, v6e,
      v5p; e4m3: TPU7x); other generations run the weight-only form.
    - ``interpret``: ``True`` (or a ``pltpu.InterpretParams``) runs in TPU interpret mode.
    """
    check_arguments(x, w, w_scale, activation_dtype)
    if interpret is True:
        interpret = pltpu.InterpretParams()
    w8a8 = activation_dtype is not None
    if w8a8 and not interpret and not mxu_multiplies(activation_dtype, device_kind()):
        raise ValueError(
            f"the TPU kernel's W8A8 {jnp.dtype(activation_dtype)} needs an MXU that multiplies "
            f"it ({device_kind() or 'no TPU'} does not: int8 on v5e/v6e/v5p, fp8 on TPU7x); "
            "use the weight-only form (activation_dtype=None)"
        )
    m, k = x.shape
    n = w.shape[0]
    out_dtype = x.dtype
    operands_dtype = jnp.dtype(activation_dtype) if w8a8 else jnp.dtype(x.dtype)
    sublanes = max(min_row_tile(operands_dtype), min_row_tile(out_dtype))
    tm = round_up(min(block_m or BLOCK_M, round_up(m, sublanes)), sublanes)
    tn = pick_block(n, block_n, BLOCK_N_CHOICES, "block_n")
    tk = pick_block(k, block_k, BLOCK_K_CHOICES, "block_k")
    padded_m = round_up(m, tm)
    grid = (padded_m // tm, n // tn, k // tk)

    operands, in_specs = [], []
    if w8a8:
        xq, xs = quantize_activations(x, activation_dtype, x_scale)
        operands += [jnp.pad(xq, ((0, padded_m - m), (0, 0))), jnp.pad(xs, (0, padded_m - m))]
        operands[1] = operands[1].reshape(padded_m, 1)
        in_specs += [
            pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((tm, 1), lambda i, j, kk: (i, 0)),
        ]
    else:
        operands.append(jnp.pad(x, ((0, padded_m - m), (0, 0))))
        in_specs.append(pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)))
    operands += [w, w_scale.astype(jnp.float32).reshape(1, n)]
    in_specs += [
        pl.BlockSpec((tn, tk), lambda i, j, kk: (j, kk)),
        pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)),
    ]
    integer = w8a8 and jnp.dtype(activation_dtype) == jnp.int8
    if vmem_limit_bytes is None:
        planned = vmem_footprint(tm, tn, tk, x.dtype, w.dtype, w8a8)
        vmem_limit_bytes = max(32 * MIB, planned + planned // 2)
    out = pl.pallas_call(
        functools.partial(
            _kernel,
            w8a8=w8a8,
            integer=integer,
            precision=None if w8a8 else precision_of(x.dtype),
            num_k=grid[2],
        ),
        out_shape=jax.ShapeDtypeStruct((padded_m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=grid,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j)),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.int32 if integer else jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=vmem_limit_bytes,
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * padded_m * n * k,
            transcendentals=0,
            bytes_accessed=int(
                w.size * w.dtype.itemsize
                + grid[1] * padded_m * k * np.dtype(operands_dtype).itemsize
                + padded_m * n * np.dtype(out_dtype).itemsize
            ),
        ),
        interpret=interpret or False,
        name="quantized_matmul",
    )(*operands)
    return out[:m]
