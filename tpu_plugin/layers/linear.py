"""Dense layers whose parameters keep Hugging Face's names and layouts.

``weight`` is stored as ``[out_features, in_features]`` exactly as in the checkpoint, so the
loader maps tensors to parameters by name alone; XLA contracts over the second axis directly,
with no transposed copy.

Quantized checkpoints replace a :class:`Linear` by a :class:`QuantizedLinear` of the same shape
(:func:`quantize_linears`, run by the loader); this module chooses its kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from vllm.logger import init_logger

from tpu_plugin import envs

logger = init_logger(__name__)


class Linear(nnx.Module):
    """``y = x @ weight.T (+ bias)``."""

    def __init__(self, in_features: int, out_features: int, dtype: jnp.dtype, bias: bool = False):
        self.weight = nnx.Param(jnp.zeros((out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.dot_general(x, self.weight[...], (((x.ndim - 1,), (1,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embedding(nnx.Module):
    """Token embedding; :meth:`attend` reuses it as the output head (tied embeddings)."""

    def __init__(self, vocab_size: int, dim: int, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.zeros((vocab_size, dim), dtype))

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], token_ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jax.lax.dot_general(
            x,
            self.weight[...],
            (((x.ndim - 1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )


# ---------------------------------------------------------------- quantized layers
# Layouts and formats: tpu_kernels.quantized_matmul (kernels) and tpu_plugin.models.quantization
# (checkpoints). The kernel is chosen here, once per process.


@functools.cache
def quantized_matmul_kernel() -> str:
    """``"tpu"``, ``"tpu-interpret"``, ``"gpu"`` or ``"reference"``: the quantized matmul
    of this process (``TPU_PLUGIN_QUANTIZED_MATMUL``).

    ``auto``: the Mosaic kernel on TPU, the Triton kernel on GPU (shapes it does not tile use
    the reference), the reference on CPU, where XLA runs it.
    """
    choice = envs.quantized_matmul_impl()
    backend = jax.default_backend()
    if choice == "reference":
        return "reference"
    if choice == "pallas-interpret":
        return "tpu-interpret"
    if choice == "pallas" or backend in ("tpu", "gpu"):
        return "gpu" if backend == "gpu" else "tpu"
    return "reference"


@functools.cache
def _note_weight_only(activation: str, kind: str) -> None:
    logger.warning(
        "%s has no %s matmul unit: W8A8 layers run weight-only (W8A16) with the same weights",
        kind or "this TPU",
        activation,
    )


def quantized_matmul(
    x: jax.Array,
    w: jax.Array,
    w_scale: jax.Array,
    *,
    activation: str | None,
    x_scale: jax.Array | None,
    name: str,
) -> jax.Array:
    """``x [M, K] @ dequantize(w [N, K]).T`` by the process's kernel (per device under TP)."""
    from tpu_kernels.quantized_matmul import gpu, reference, tpu
    from tpu_plugin.parallel.shard_kernels import sharded_matmul

    act = jnp.dtype(activation) if activation else None
    kernel = quantized_matmul_kernel()
    if kernel == "gpu" and gpu.supports(w.shape[0], w.shape[1]):
        fn = gpu.quantized_matmul
    elif kernel in ("tpu", "tpu-interpret"):
        interpret = kernel == "tpu-interpret"
        if act is not None and not interpret and not tpu.mxu_multiplies(act, tpu.device_kind()):
            _note_weight_only(str(act), tpu.device_kind())
            act, x_scale = None, None
        fn = functools.partial(tpu.quantized_matmul, interpret=interpret)
    else:
        return reference.quantized_matmul(x, w, w_scale, activation_dtype=act, x_scale=x_scale)
    return sharded_matmul(fn, name)(x, w, w_scale, activation_dtype=act, x_scale=x_scale)


class QuantizedLinear(nnx.Module):
    """``y = x @ dequantize(weight).T (+ bias)`` for an 8-bit or 4-bit :class:`Scheme`.

    Parameters keep the checkpoint's names: ``weight`` ``[*out, in]`` (int8 / e4m3, or int4 /
    uint4), ``weight_scale`` (``[*out]``, one per output row; 4-bit: ``[*out, in / group]``),
    ``weight_zero_point`` (4-bit with zero points), ``input_scale`` (W8A8, static). ``name``
    (the module's path) lets the tensor-parallel wrapper find its parameters' shardings.
    """

    def __init__(
        self,
        in_features: int,
        out_shape: tuple[int, ...],
        dtype: jnp.dtype,
        scheme: Any,
        *,
        bias: bool,
        name: str,
    ):
        self.scheme, self.name = scheme, name
        out = tuple(out_shape)
        if scheme.weight == "int4":
            groups = (*out, in_features // scheme.group_size)
            weight_dtype = jnp.uint4 if scheme.zero_point else jnp.int4
            self.weight = nnx.Param(jnp.zeros((*out, in_features), weight_dtype))
            self.weight_scale = nnx.Param(jnp.zeros(groups, jnp.float32))
            zero = nnx.Param(jnp.zeros(groups, jnp.uint4)) if scheme.zero_point else None
            self.weight_zero_point = zero
        else:
            self.weight = nnx.Param(jnp.zeros((*out, in_features), jnp.dtype(scheme.weight)))
            self.weight_scale = nnx.Param(jnp.zeros(out, jnp.float32))
        static = scheme.static_input_scale
        self.input_scale = nnx.Param(jnp.zeros((), jnp.float32)) if static else None
        self.bias = nnx.Param(jnp.zeros(out, dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        from tpu_kernels.quantized_matmul import reference

        w = self.weight[...]
        k = w.shape[-1]
        out = w.shape[:-1]
        x2 = x.reshape(-1, k)
        if self.scheme.weight == "int4":
            zero = self.weight_zero_point
            y = reference.int4_matmul(
                x2,
                w.reshape(-1, k),
                self.weight_scale[...].reshape(-1, k // self.scheme.group_size),
                None if zero is None else zero[...].reshape(-1, k // self.scheme.group_size),
                group_size=self.scheme.group_size,
            )
        else:
            y = quantized_matmul(
                x2,
                w.reshape(-1, k),
                self.weight_scale[...].reshape(-1),
                activation=self.scheme.activation,
                x_scale=None if self.input_scale is None else self.input_scale[...],
                name=self.name,
            )
        y = y.reshape(*x.shape[:-1], *out)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def quantize_linears(model: nnx.Module, scheme_for: Callable[[str], Any]) -> int:
    """Replaces every :class:`Linear` of ``model`` whose path has a scheme by a
    :class:`QuantizedLinear` of the same shape; returns how many. Run on the abstract model
    (inside ``nnx.eval_shape``), before the checkpoint is read."""
    replaced = 0
    for path, module in list(nnx.iter_modules(model)):
        if type(module) is not Linear and not isinstance(module, Linear):
            continue
        name = ".".join(str(p) for p in path)
        scheme = scheme_for(name)
        if scheme is None or not path:
            continue
        parent = model
        for part in path[:-1]:
            parent = parent[part] if isinstance(part, int) else getattr(parent, part)
        w = module.weight.get_value()
        quantized = QuantizedLinear(
            w.shape[-1],
            tuple(w.shape[:-1]),
            w.dtype,
            scheme,
            bias=module.bias is not None,
            name=name,
        )
        setattr(parent, str(path[-1]), quantized)
        replaced += 1
    return replaced
