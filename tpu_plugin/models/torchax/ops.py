"""The one place where torch ops that torchax cannot lower get JAX implementations.

vLLM built with ``VLLM_TARGET_DEVICE=empty`` has no compiled ``_C`` kernels; on this platform
its ``CustomOp`` layers (activations, rotary embedding, ...) dispatch to ``forward_oot``, their
PyTorch-native form, which torchax lowers op by op. What torchax cannot lower are vLLM's own
custom torch ops (``torch.ops.vllm_ir.rms_norm`` and friends, ``torch.ops.vllm.*``), whose
kernels run host or CUDA code: those that models call get a JAX implementation in
``_JAX_IMPLS`` below, and every other one is registered to fail naming itself and this file.
An aten op torchax lacks fails the same way (:func:`naming_missing_ops`), at trace time, which
is engine start-up or the first step of a new shape bucket.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import torch
import torchax
from torchax.ops import mappings, ops_registry
from torchax.tensor import OperatorNotFound


def _promote_types(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types`` (vLLM's norms pick their compute dtype with it).

    It takes dtypes, not tensors, yet inside torchax's function mode it still dispatches as
    ``aten::promote_types``, which torchax has no entry for. JAX's promotion lattice agrees
    with torch's on the float types models use (f32 with bf16 or f16 -> f32, bf16 with f16 ->
    f32).
    """
    return mappings.j2t_dtype(jnp.promote_types(mappings.t2j_dtype(a), mappings.t2j_dtype(b)))


def _rms_norm(
    x: jax.Array, weight: jax.Array | None, epsilon: float, variance_size: int | None = None
) -> jax.Array:
    """``vllm_ir.rms_norm``: normalise in float32 (over the first ``variance_size`` features
    when given), scale by ``weight`` in its dtype, return in ``x``'s dtype."""
    xf = x.astype(jnp.float32)
    part = xf if variance_size is None else xf[..., :variance_size]
    y = xf * jax.lax.rsqrt(jnp.mean(part * part, axis=-1, keepdims=True) + epsilon)
    if weight is not None:
        y = y.astype(weight.dtype) * weight
    return y.astype(x.dtype)


def _fused_add_rms_norm(
    x: jax.Array,
    residual: jax.Array,
    weight: jax.Array | None,
    epsilon: float,
    variance_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``vllm_ir.fused_add_rms_norm``: ``(rms_norm(x + residual), x + residual)``, the sum
    taken in float32 and returned in ``x``'s dtype (the next layer's residual)."""
    summed = x.astype(jnp.float32) + residual.astype(jnp.float32)
    return _rms_norm(summed, weight, epsilon, variance_size).astype(x.dtype), summed.astype(x.dtype)


def _gelu_and_mul_sparse(x: jax.Array, std_multiplier: float, approximate: str = "none"):
    """``vllm_ir.gelu_and_mul_sparse``: GELU of the gate shifted by mean + k * std (population
    std, per row), clipped at zero, times the up half."""
    d = x.shape[-1] // 2
    gate, up = x[..., :d], x[..., d:]
    mean = jnp.mean(gate, axis=-1, keepdims=True)
    std = jnp.std(gate, axis=-1, keepdims=True)
    sparse = jax.nn.relu(gate - (mean + std * std_multiplier))
    return jax.nn.gelu(sparse, approximate=approximate == "tanh") * up


CUSTOM_OP_NAMESPACES = ("vllm", "vllm_ir", "_C", "_moe_C", "_rocm_C")

# torch op name -> JAX implementation (tensors arrive as jax arrays, other arguments as given).
# vLLM's IR ops (``torch.ops.vllm_ir``) are custom torch ops whose kernels torchax cannot see
# into; aten::promote_types is a dtype-only op torchax does not list.
_JAX_IMPLS: dict[str, Callable[..., Any]] = {
    "aten.promote_types.default": _promote_types,
    "vllm_ir.rms_norm.default": _rms_norm,
    "vllm_ir.fused_add_rms_norm.default": _fused_add_rms_norm,
    "vllm_ir.fused_add_rms_norm.maybe_inplace": _fused_add_rms_norm,
    "vllm_ir.gelu_and_mul_sparse.default": _gelu_and_mul_sparse,
}


def _resolve(qualified: str) -> Any | None:
    """``torch.ops.<namespace>.<op>.<overload>``, or None if this build does not define it."""
    import vllm.ir.ops  # noqa: F401  (defines the vllm_ir namespace)

    node: Any = torch.ops
    try:
        for part in qualified.split("."):
            node = getattr(node, part)
    except (AttributeError, RuntimeError):
        return None
    return node


def jax_ops() -> dict[Any, Callable[..., Any]]:
    """The torch ops of this build that get a JAX implementation here."""
    table = {_resolve(name): impl for name, impl in _JAX_IMPLS.items()}
    table.pop(None, None)
    return table


class MissingLoweringError(NotImplementedError):
    """A torch op in the model has no JAX implementation (names the op and where to add one)."""


def _missing(name: str) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise MissingLoweringError(
            f"vLLM custom op {name} has no JAX implementation; register one in "
            "tpu_plugin/models/torchax/ops.py (_JAX_IMPLS) to run this model"
        )

    return fail


def _vllm_custom_ops() -> dict[str, Any]:
    """Every overload of vLLM's custom torch ops defined in this process so far, by name.

    Their kernels are host/CUDA code that cannot run on torchax tensors; without an entry
    torchax would hand the op torchax tensors and fail with an assert that names nothing.
    """
    found = {}
    for qualified in torch._C._dispatch_get_all_op_names():
        namespace, _, rest = qualified.partition("::")
        if namespace not in CUSTOM_OP_NAMESPACES:
            continue
        name, _, overload = rest.partition(".")
        op = _resolve(f"{namespace}.{name}.{overload or 'default'}")
        if op is not None:
            found[f"{namespace}::{rest}"] = op
    return found


def _install(env: torchax.tensor.Environment, op: Any, impl: Callable[..., Any]) -> None:
    env._ops[op] = ops_registry.Operator(
        op, impl, is_jax_function=True, is_user_defined=True, needs_env=False, is_view_op=False
    )


def torchax_env() -> torchax.tensor.Environment:
    """torchax's environment with this module's table installed.

    Called for every model built, after vLLM imported the model's modules (custom ops are
    registered at import): each vLLM custom op gets its JAX implementation, or one that fails
    naming the op.
    """
    env = _default_env()
    implemented = jax_ops()
    for name, op in _vllm_custom_ops().items():
        if op not in implemented and op not in env._ops:
            _install(env, op, _missing(name))
    for op, impl in implemented.items():
        _install(env, op, impl)
    return env


@functools.cache
def _default_env() -> torchax.tensor.Environment:
    # vLLM's layers read ``tensor.data`` while tracing; torchax warns on every read that an
    # in-place ``.data`` write would copy, but the getter returns the tensor itself and no
    # write happens here, so the warning (one per layer per compile) is only noise.
    logging.getLogger("torchax.tensor").addFilter(
        lambda record: "In-place to .data" not in record.getMessage()
    )
    return torchax.default_env()


@contextlib.contextmanager
def naming_missing_ops() -> Iterator[None]:
    """Turns torchax's unknown-operator error into one naming the op and the fix."""
    try:
        yield
    except OperatorNotFound as error:
        raise MissingLoweringError(
            f"{error} in torchax: this model needs a JAX implementation of that torch op "
            "registered in tpu_plugin/models/torchax/ops.py (_JAX_IMPLS)"
        ) from error
