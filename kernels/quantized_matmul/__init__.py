"""Quantized matmuls: ``x @ dequantize(w).T`` with the weight in fewer bytes.

Decode reads every weight once per step and does almost no arithmetic on it, so its speed is
the weight's bytes over the memory bandwidth: an 8-bit weight is half the bytes of bf16, a 4-bit
one a quarter. The layout shared by every implementation (``reference``, ``tpu``, ``gpu``):

- ``x``: ``[M, K]`` activations, float32 / bfloat16 / float16.
- 8-bit weights: ``w`` ``[N, K]`` (Hugging Face ``[out, in]``) in ``int8`` or ``float8_e4m3fn``
  with one float32 scale per output row, ``w_scale`` ``[N]``: ``W[n, k] = w[n, k] * w_scale[n]``.
- 4-bit weights (``int4_matmul``): ``w`` ``[N, K]`` in ``jnp.int4`` (symmetric) or ``jnp.uint4``
  with zero points, scales ``[N, K / group]`` (and zero points of the same shape):
  ``W[n, k] = (w[n, k] - zero[n, k // g]) * scale[n, k // g]``.
- Activations: ``None`` (weight-only, "W8A16": ``x`` multiplies the weight in its own dtype) or
  ``int8`` / ``float8_e4m3fn`` ("W8A8": ``x`` quantized per row, symmetric, with a scale per
  row computed on the fly, or one static scale ``x_scale`` from the checkpoint).

Result ``[M, N]`` in ``x.dtype``; accumulation in float32 (int32 for int8 x int8).
"""

from .reference import (
    FP8_MAX,
    INT8_MAX,
    quantize_activations,
    quantize_per_channel,
    quantized_matmul,
)

__all__ = [
    "FP8_MAX",
    "INT8_MAX",
    "quantize_activations",
    "quantize_per_channel",
    "quantized_matmul",
]
