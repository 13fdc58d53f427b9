"""The quantized matmul as a Pallas GPU kernel (Triton lowering); numbers as ``reference.py``.

Grid ``(M / block_m, N / block_n, splits)``. A program owns a ``[block_m, block_n]`` output
tile and walks its share of the contraction in ``block_k`` steps (``lax.fori_loop``): it loads
the ``[block_m, block_k]`` activation tile and the ``[block_n, block_k]`` 8-bit weight tile and

- weight-only (W8A16): casts the weight tile to the activations' dtype **in registers** (exact
  for int8 and e4m3) and multiplies on the tensor cores with float32 accumulation, so only the
  8-bit weight crosses HBM (XLA alone writes a dequantized copy first: ../shared/MEASURED.md);
- W8A8: multiplies the 8-bit tiles directly, the activations quantized per row before the
  call: e4m3 x e4m3 on Hopper's fp8 tensor cores (float32 accumulation), int8 x int8 into
  int32.

The per-row weight scales (and, for W8A8, the activations' per-row scales) rescale the
accumulated tile once at the end. Decode (``M`` of 1-32) reads every weight byte once and has
too few output tiles to keep an H100/H200 busy (``N / block_n`` programs), so the contraction
is split (``splits`` programs per tile, float32 partials summed by XLA after the call) until
about :data:`TARGET_PROGRAMS` programs exist.

Triton needs power-of-two tiles of at least 16 for ``tl.dot``: ``N`` and ``K`` must be
multiples of ``block_n`` and ``splits x block_k`` (:func:`supports` says whether the defaults
take a shape; the plugin uses the reference otherwise).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .reference import check_arguments, precision_of, quantize_activations

MIN_DOT_SIZE = 16
# Enough programs to have many weight loads in flight on 132 SMs (~8 per SM) ...
TARGET_PROGRAMS = 1024
# ... each split keeping at least this many block_k steps ...
MIN_STEPS_PER_SPLIT = 4
MAX_SPLITS = 16


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes and Triton parameters of one call."""

    block_m: int
    block_n: int
    block_k: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _is_power_of_2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def default_config(m: int, n: int, k: int) -> Config:
    """Tiles for ``[M, K] x [N, K]``: 16-row tiles and a split contraction for decode-sized
    ``M`` (bound by the weight's bytes), 64 x 128 tiles without splits for large ``M``."""
    if m <= 64:
        block_m, block_n, block_k = max(MIN_DOT_SIZE, _next_power_of_2(m)), 64, 128
    else:
        block_m, block_n, block_k = 64, 128, 64
    while block_n > MIN_DOT_SIZE and n % block_n:
        block_n //= 2
    while block_k > MIN_DOT_SIZE and k % block_k:
        block_k //= 2
    return Config(block_m, block_n, block_k, split_count(m, n, k, block_m, block_n, block_k))


def split_count(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int) -> int:
    """Contraction splits for decode-sized ``M``: doubled while the grid stays under
    :data:`TARGET_PROGRAMS` and each split keeps :data:`MIN_STEPS_PER_SPLIT` ``block_k`` steps
    (1 for ``M`` over 64, where the output tiles alone fill the GPU)."""
    programs = -(-m // block_m) * max(1, n // block_n)
    splits = 1
    while (
        m <= 64
        and splits * 2 <= MAX_SPLITS
        and programs * splits * 2 <= TARGET_PROGRAMS
        and k % (splits * 2 * block_k) == 0
        and k // (splits * 2 * block_k) >= MIN_STEPS_PER_SPLIT
    ):
        splits *= 2
    return splits


def supports(n: int, k: int, config: Config | None = None) -> bool:
    """Whether the kernel takes ``N``/``K`` with ``config`` (default: :func:`default_config`)."""
    config = config or default_config(1, n, k)
    return (
        min(config.block_n, config.block_k) >= MIN_DOT_SIZE
        and _is_power_of_2(config.block_n)
        and _is_power_of_2(config.block_k)
        and n % config.block_n == 0
        and k % (config.block_k * config.splits) == 0
    )


def _kernel(*refs, w8a8: bool, config: Config, steps: int, precision):
    if w8a8:
        x_ref, xs_ref, w_ref, ws_ref, o_ref = refs
    else:
        x_ref, w_ref, ws_ref, o_ref = refs
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    rows, cols = pl.ds(i * bm, bm), pl.ds(j * bn, bn)
    first = s * steps * bk

    def body(step, acc):
        ks = pl.ds(first + step * bk, bk)
        x = x_ref[rows, ks]
        w = w_ref[cols, ks]
        if not w8a8:
            w = w.astype(x.dtype)  # dequantize in registers: a cast
        return acc + plgpu.dot(x, w, trans_b=True, precision=precision).astype(acc.dtype)

    integer = w8a8 and x_ref.dtype == jnp.int8
    acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.int32 if integer else jnp.float32))
    out = acc.astype(jnp.float32) * ws_ref[cols][None, :]
    if w8a8:
        out = out * xs_ref[rows][:, None]
    if config.splits == 1:
        o_ref[rows, cols] = out.astype(o_ref.dtype)
    else:
        o_ref[s, rows, cols] = out


@functools.partial(jax.jit, static_argnames=("activation_dtype", "config", "interpret"))
def quantized_matmul(
    x: jax.Array,
    w: jax.Array,
    w_scale: jax.Array,
    *,
    activation_dtype=None,
    x_scale: jax.Array | None = None,
    config: Config | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``[M, N]`` in ``x.dtype``; arguments and numbers as ``reference.quantized_matmul``.

    ``config``: tiles, splits and Triton parameters (default :func:`default_config`);
    ``interpret``: Pallas interpret mode (any backend, CPU included).
    """
    check_arguments(x, w, w_scale, activation_dtype)
    m, k = x.shape
    n = w.shape[0]
    config = config or default_config(m, n, k)
    if not supports(n, k, config):
        raise ValueError(
            f"the GPU kernel needs power-of-two tiles of at least {MIN_DOT_SIZE} dividing "
            f"N={n} and K={k} (block_n {config.block_n}, block_k {config.block_k} x "
            f"{config.splits} splits); use tpu_kernels.quantized_matmul.reference"
        )
    if config.block_m < MIN_DOT_SIZE or not _is_power_of_2(config.block_m):
        raise ValueError(f"block_m must be a power of two >= {MIN_DOT_SIZE}, got {config.block_m}")
    w8a8 = activation_dtype is not None
    padded_m = -(-m // config.block_m) * config.block_m
    pad = ((0, padded_m - m), (0, 0))
    if w8a8:
        xq, xs = quantize_activations(x, activation_dtype, x_scale)
        operands = [jnp.pad(xq, pad), jnp.pad(xs, (0, padded_m - m))]
    else:
        operands = [jnp.pad(x, pad)]
    operands += [w, w_scale.astype(jnp.float32)]
    steps = k // (config.block_k * config.splits)
    if config.splits == 1:
        out_shape = jax.ShapeDtypeStruct((padded_m, n), x.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((config.splits, padded_m, n), jnp.float32)
    out = pl.pallas_call(
        functools.partial(
            _kernel,
            w8a8=w8a8,
            config=config,
            steps=steps,
            precision=None if w8a8 else precision_of(x.dtype),
        ),
        grid=(padded_m // config.block_m, n // config.block_n, config.splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="quantized_matmul",
    )(*operands)
    if config.splits > 1:
        out = jnp.sum(out, axis=0).astype(x.dtype)
    return out[:m]
