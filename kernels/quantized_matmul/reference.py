"""The quantized matmul specification in plain ``jax.numpy`` (layout in ``__init__.py``).

The obvious computation, written so the numbers are unambiguous; the Pallas kernels are tested
against it, and it is what XLA runs where no kernel takes the shapes.

Numerics:

- Weight-only (W8A16): ``(x @ w.astype(x.dtype).T) * w_scale``, the product accumulated in
  float32 (``Precision.HIGHEST`` for float32 ``x``). Casting an int8 or e4m3 value to
  bf16/fp16/fp32 is exact, and the per-row scale is applied once to the accumulated column,
  so the only rounding beyond the plain matmul's is the final cast.
- W8A8: ``x`` is quantized per row (``quantize_activations``), the 8-bit product is exact
  (int32 for int8, float32 for e4m3: every product of two e4m3 values is exact in float32),
  and ``x_scale[m] * w_scale[n]`` rescales it.
- 4-bit groups (W4A16): the weight is dequantized in float32, rounded to ``x.dtype`` (what a
  decompressed checkpoint holds) and multiplied with float32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

INT8_MAX = 127.0
INT8_ACTIVATION_STEPS = 127.5  # half of the 255 steps of [-128, 127]
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448
WEIGHT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
INT4_DTYPES = (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))


def qmax(dtype: jnp.dtype) -> float:
    """The largest magnitude of the quantized type (symmetric range)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return INT8_MAX
    if dtype == jnp.float8_e4m3fn:
        return FP8_MAX
    raise ValueError(f"quantized type must be int8 or float8_e4m3fn, got {dtype}")


def to_quantized(values: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``values`` (already divided by their scale) in ``dtype``: rounded to nearest and
    saturated (an out-of-range float cast to e4m3 would be NaN, e4m3 has no infinity)."""
    limit = qmax(dtype)
    values = jnp.clip(values.astype(jnp.float32), -limit, limit)
    if jnp.dtype(dtype) == jnp.int8:
        values = jnp.round(values)
    return values.astype(dtype)


def divide(a: jax.Array, b: jax.Array | float) -> jax.Array:
    """``a / b`` correctly rounded, ``b`` a constant or broadcast over ``a``.

    XLA turns a division by a constant or by a broadcast row into a multiplication by the
    (rounded) reciprocal: one ulp off in most quotients, which moves values sitting on a
    rounding boundary (a row's absmax lands a hair below 127.5 or 448) to the other side of
    it, where the formats' libraries (exact divisions) do not. The barrier keeps the
    division a true one.
    """
    return a / lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


def quantize_per_channel(w: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-output-row quantization of ``w`` ``[..., K]``: ``(q, scale [...])``.

    ``scale = max|w[n]| / qmax``; an all-zero row gets scale 1 (any value reproduces it).
    Bit-identical to compressed-tensors' channel quantization of the same weight.
    """
    wf = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(wf), axis=-1)
    scale = jnp.where(absmax > 0, divide(absmax, qmax(dtype)), 1.0)
    return to_quantized(divide(wf, scale[..., None]), dtype), scale


def quantize_activations(
    x: jax.Array, dtype: jnp.dtype, scale: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``x`` ``[M, K]`` in ``dtype`` and its float32 scale per row ``[M]``.

    ``scale`` ``None``: dynamic, symmetric per row (``max|x[m]| / 127.5`` for int8, ``/ 448``
    for e4m3; a zero row gets 1).
    Otherwise a static scale (a scalar, e.g. a checkpoint's per-tensor ``input_scale``).
    """
    xf = x.astype(jnp.float32)
    int8 = jnp.dtype(dtype) == jnp.int8
    if scale is None:
        absmax = jnp.max(jnp.abs(xf), axis=-1)
        # int8: compressed-tensors' symmetric range, 255 steps over [-absmax, absmax]
        # (absmax / 127.5, clipped to [-128, 127]), so W8A8 checkpoints compute what their
        # format's library computes; e4m3: absmax / 448.
        step = INT8_ACTIVATION_STEPS if int8 else qmax(dtype)
        row_scale = jnp.where(absmax > 0, divide(absmax, step), 1.0)
    else:
        row_scale = jnp.broadcast_to(jnp.reshape(scale, ()).astype(jnp.float32), x.shape[:-1])
    values = divide(xf, row_scale[..., None])
    if int8:
        return jnp.clip(jnp.round(values), -128, 127).astype(jnp.int8), row_scale
    return to_quantized(values, dtype), row_scale


def dequantize(w: jax.Array, w_scale: jax.Array) -> jax.Array:
    """The float32 weight an 8-bit weight and its per-row scale stand for."""
    return w.astype(jnp.float32) * w_scale[..., None].astype(jnp.float32)


def check_arguments(x: jax.Array, w: jax.Array, w_scale: jax.Array, activation_dtype) -> None:
    """The shape and type checks every implementation shares (same sentences everywhere)."""
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"x must be [M, K] and w [N, K], got {x.shape} and {w.shape}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but w {w.shape} has K={w.shape[1]}")
    if w_scale.shape != (w.shape[0],):
        raise ValueError(f"w_scale must be [N={w.shape[0]}] (one per row), got {w_scale.shape}")
    if jnp.dtype(w.dtype) not in WEIGHT_DTYPES:
        raise ValueError(f"w must be int8 or float8_e4m3fn, got {w.dtype}")
    if activation_dtype is not None and jnp.dtype(activation_dtype) != jnp.dtype(w.dtype):
        raise ValueError(
            f"W8A8 multiplies activations and weights of one type; got activations "
            f"{jnp.dtype(activation_dtype)} and weights {w.dtype}"
        )


def precision_of(dtype: jnp.dtype) -> lax.Precision | None:
    """Full float32 matmuls for float32 inputs (no bf16 passes); native otherwise."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _nt(a: jax.Array, b: jax.Array, **kwargs) -> jax.Array:
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), **kwargs)


def quantized_matmul(
    x: jax.Array,
    w: jax.Array,
    w_scale: jax.Array,
    *,
    activation_dtype: jnp.dtype | None = None,
    x_scale: jax.Array | None = None,
) -> jax.Array:
    """``[M, N]`` in ``x.dtype``: ``x @ (w * w_scale[:, None]).T`` (see the module doc).

    ``activation_dtype`` ``None``: weight-only. ``int8`` / ``float8_e4m3fn``: W8A8, with the
    per-row dynamic scales of :func:`quantize_activations`, or the static ``x_scale``.
    """
    check_arguments(x, w, w_scale, activation_dtype)
    if activation_dtype is None:
        acc = _nt(
            x,
            w.astype(x.dtype),
            precision=precision_of(x.dtype),
            preferred_element_type=jnp.float32,
        )
        return (acc * w_scale.astype(jnp.float32)).astype(x.dtype)
    xq, xs = quantize_activations(x, activation_dtype, x_scale)
    if jnp.dtype(activation_dtype) == jnp.int8:
        acc = _nt(xq.astype(jnp.int32), w.astype(jnp.int32)).astype(jnp.float32)
    else:  # e4m3 x e4m3 products are exact in float32
        acc = _nt(
            xq.astype(jnp.float32),
            w.astype(jnp.float32),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
    return (acc * xs[:, None] * w_scale.astype(jnp.float32)[None, :]).astype(x.dtype)


def dequantize_int4(
    w: jax.Array, scale: jax.Array, zero: jax.Array | None, group_size: int
) -> jax.Array:
    """The float32 weight ``[N, K]`` of a 4-bit group-quantized one (module doc)."""
    n, k = w.shape
    if jnp.dtype(w.dtype) not in INT4_DTYPES:
        raise ValueError(f"4-bit weights must be int4 or uint4, got {w.dtype}")
    if k % group_size or scale.shape != (n, k // group_size):
        raise ValueError(
            f"scales must be [N={n}, K / group = {k}/{group_size}] with K a multiple of the "
            f"group, got {scale.shape}"
        )
    if zero is not None and zero.shape != scale.shape:
        raise ValueError(f"zero points must have the scales' shape {scale.shape}, got {zero.shape}")
    groups = w.astype(jnp.float32).reshape(n, k // group_size, group_size)
    if zero is not None:
        groups = groups - zero.astype(jnp.float32)[..., None]
    return (groups * scale.astype(jnp.float32)[..., None]).reshape(n, k)


def int4_matmul(
    x: jax.Array,
    w: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None = None,
    *,
    group_size: int,
) -> jax.Array:
    """``[M, N]`` in ``x.dtype``: ``x @ dequantize_int4(w, ...).T`` (W4A16, module doc)."""
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be [M, K={w.shape[1]}], got {x.shape}")
    weight = dequantize_int4(w, scale, zero, group_size).astype(x.dtype)
    return _nt(
        x, weight, precision=precision_of(x.dtype), preferred_element_type=jnp.float32
    ).astype(x.dtype)
