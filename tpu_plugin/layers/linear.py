"""Dense layers whose parameters keep Hugging Face's names and layouts, and fused projections.

``weight`` is stored as ``[out_features, in_features]`` exactly as in the checkpoint, so the
loader maps tensors to parameters by name alone; XLA contracts over the last axis directly,
with no transposed copy. This module is the one place that chooses how a projection is
multiplied (quantized matmuls land here too).

Projections that read the same input run as one matmul (:class:`FusedLinear`): q/k/v
(``self_attn.qkv_proj``), gate/up (``mlp.gate_up_proj``) and MLA's two down-projections
(``self_attn.fused_qkv_a_proj``). One wider matmul reads the same weight bytes as the parts but
is one kernel instead of two or three, and its input is read once. The fused weight is laid out
so that tensor parallelism can split it contiguously on one axis and every device still holds
matching parts (:class:`Fusion`); the loader builds it from the checkpoint's separate tensors,
or cuts a checkpoint's own fused tensor (Phi-3's ``[q; k; v]`` and ``[gate; up]``) first.

Quantized checkpoints replace a :class:`Linear` (fused or not) by a :class:`QuantizedLinear` of
the same shape (:func:`quantize_linears`, run by the loader); its scales are fused exactly like
its weight rows (see :class:`Fusion`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from vllm.logger import init_logger

from tpu_plugin import envs

logger = init_logger(__name__)


class Linear(nnx.Module):
    """``y = x @ weight.T (+ bias)``; ``out_features`` may be a shape (``weight`` is then
    ``[*out_features, in_features]`` and ``y`` ends in ``out_features``). Plus the token's LoRA
    adapter where the runner attached adapter slots (``lora``, a
    ``tpu_plugin.layers.lora.LoRASlots``; ``None`` otherwise), its output in the weight's own
    output layout (a fused projection's too).

    A shaped weight is multiplied as the 2-D matrix ``[prod(out_features), in_features]`` (a
    reshape of its row-major layout, no data moves): a dot with several output dimensions is
    canonicalised by XLA into a transpose of the weight, which XLA's CPU backend materialised
    as a copy of the whole weight every step (``tools/hlo_inventory.py`` on a CPU compile
    showed one per fused weight; the 2-D form is the canonical one on every backend). Tensor
    parallelism splits a fused weight on axis 0 only, which the reshape keeps contiguous per
    device.
    """

    lora: nnx.Module | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int | tuple[int, ...],
        dtype: jnp.dtype,
        bias: bool = False,
    ):
        out = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        self.weight = nnx.Param(jnp.zeros((*out, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros(out, dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        out = w.shape[:-1]
        w = w.reshape(-1, w.shape[-1])
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))
        y = y.reshape(*x.shape[:-1], *out)
        if self.bias is not None:
            y = y + self.bias[...]
        if self.lora is not None and (update := self.lora(x)) is not None:
            y = y + update
        return y


@dataclasses.dataclass(frozen=True)
class Fusion:
    """How one fused weight holds several Hugging Face projections of the same input.

    ``parts``: ``(module name, output rows)`` of each projection, in order, as named in the
    checkpoint next to the fused module (``("q_proj", 4096), ("k_proj", 1024), …``).

    The weight is ``[groups, sum(rows) / groups, in]``: group ``j`` holds the ``j``-th
    ``1 / groups`` of every part's rows, in part order, so a contiguous split over axis 0 gives
    each device whole groups:

    - q/k/v, ``groups`` = KV heads: group ``j`` is the query heads that share KV head ``j``,
      then that K head, then that V head; each device gets whole heads, its queries with their
      own keys and values (grouped-query attention maps query head ``h`` to KV head
      ``h // (heads / kv_heads)``, as HF does);
    - gate/up, ``groups`` = intermediate rows: row ``i`` of gate, then row ``i`` of up
      (``[I, 2, in]``); each device gets the same rows of both;
    - MLA's two input projections, ``groups`` = 1 (never split: they are replicated).

    The layout has the same shape whatever the device count, so the model stays device free and
    one checkpoint serves every tensor-parallel size; axis 0 is the only one split, which keeps
    :class:`Linear`'s 2-D view of the weight contiguous per device.
    """

    parts: tuple[tuple[str, int], ...]
    groups: int

    def __post_init__(self) -> None:
        if self.groups < 1 or any(r % self.groups for _, r in self.parts):
            raise ValueError(f"{self.parts}: every part's rows must divide into {self.groups}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts)

    @property
    def rows(self) -> int:
        """Output rows of all parts together (the checkpoint's fused tensor, Phi-3 style)."""
        return sum(r for _, r in self.parts)

    def out_shape(self) -> tuple[int, int]:
        return self.groups, self.rows // self.groups

    def pack(self, tensors: list[np.ndarray]) -> np.ndarray:
        """The fused parameter from the parts' checkpoint tensors (``[rows_i, ...]`` each)."""
        xp = jnp if any(isinstance(t, jax.Array) for t in tensors) else np
        grouped = [t.reshape(self.groups, -1, *t.shape[1:]) for t in tensors]
        return xp.concatenate(grouped, axis=1)

    def unpack(self, fused: np.ndarray) -> list[np.ndarray]:
        """The parts, in the checkpoint's per-part layout (the inverse of :meth:`pack`)."""
        return list(self.split(jnp.asarray(fused), axis=0))

    def cut_concatenated(self, tensor: np.ndarray) -> list[np.ndarray]:
        """A checkpoint's fused tensor, parts concatenated on axis 0 (Phi-3), cut into them."""
        xp = jnp if isinstance(tensor, jax.Array) else np
        return list(xp.split(tensor, np.cumsum([r for _, r in self.parts])[:-1], axis=0))

    def split(self, y: jax.Array, axis: int = -1) -> tuple[jax.Array, ...]:
        """The parts of a fused result whose fused axes (``out_shape``) start at ``axis``,
        each flattened to its checkpoint layout (``[..., rows_i, ...]``)."""
        axis = axis % y.ndim
        lead, tail = y.shape[:axis], y.shape[axis + 2 :]
        out, start = [], 0
        for _, rows in self.parts:
            width = rows // self.groups
            part = jax.lax.slice_in_dim(y, start, start + width, axis=axis + 1)
            out.append(part.reshape(*lead, rows, *tail))
            start += width
        return tuple(out)


class FusedLinear(Linear):
    """One matmul for the projections of :class:`Fusion`; :meth:`parts` gives them apart.

    ``weight`` is ``[*fusion.out_shape(), in_features]``; the parameter name is the fused
    module's (``qkv_proj``, ``gate_up_proj``), the checkpoint tensors it is built from are the
    parts' names (see :mod:`tpu_plugin.models.loader`).
    """

    def __init__(self, in_features: int, fusion: Fusion, dtype: jnp.dtype, bias: bool = False):
        super().__init__(in_features, fusion.out_shape(), dtype, bias=bias)
        self.fusion = fusion

    def parts(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Every part's output, ``[..., rows_i]`` (as the separate projections would give)."""
        return self.fusion.split(self(x), axis=x.ndim - 1)


def grouped_qkv(num_heads: int, num_kv_heads: int, head_dim: int) -> Fusion:
    """q/k/v of grouped-query attention, grouped by KV head (see :class:`Fusion`)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    return Fusion(
        (
            ("q_proj", num_heads * head_dim),
            ("k_proj", num_kv_heads * head_dim),
            ("v_proj", num_kv_heads * head_dim),
        ),
        groups=num_kv_heads,
    )


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
    weight_shape: tuple[int, ...] | None = None,
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
    return sharded_matmul(fn, name, weight_shape)(
        x, w, w_scale, activation_dtype=act, x_scale=x_scale
    )


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
        fusion: Fusion | None = None,
    ):
        self.scheme, self.name, self.fusion = scheme, name, fusion
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
                weight_shape=tuple(w.shape),
            )
        y = y.reshape(*x.shape[:-1], *out)
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def parts(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """A fused layer's parts' outputs, as :meth:`FusedLinear.parts` gives them."""
        if self.fusion is None:
            raise TypeError(f"{self.name} is not a fused projection")
        return self.fusion.split(self(x), axis=x.ndim - 1)


def fused_scheme(name: str, fusion: Fusion, scheme_for: Callable[[str], Any]) -> Any:
    """The scheme of fused projection ``name`` (``model.layers.0.self_attn.qkv_proj``): its
    parts' (``…self_attn.q_proj``, ``k_proj``, ``v_proj``, as the checkpoint names them), which
    must agree, as one matmul has one scheme (vLLM requires the same of its fused layers)."""
    parent = name.rpartition(".")[0]
    parts = [f"{parent}.{p}" if parent else p for p in fusion.names]
    schemes = {part: scheme_for(part) for part in parts}
    if len(set(schemes.values())) > 1:
        shown = ", ".join(f"{p}: {s}" for p, s in schemes.items())
        raise ValueError(
            f"{name} fuses projections quantized differently ({shown}); one fused matmul has "
            "one scheme: quantize them alike"
        )
    # a checkpoint's own fused module (Phi-3's qkv_proj) may be what the config names
    return schemes[parts[0]] if schemes[parts[0]] is not None else scheme_for(name)


def quantize_linears(model: nnx.Module, scheme_for: Callable[[str], Any]) -> int:
    """Replaces every :class:`Linear` of ``model`` whose path has a scheme by a
    :class:`QuantizedLinear` of the same shape; returns how many. Run on the abstract model
    (inside ``nnx.eval_shape``), before the checkpoint is read."""
    replaced = 0
    for path, module in list(nnx.iter_modules(model)):
        if type(module) is not Linear and not isinstance(module, Linear):
            continue
        name = ".".join(str(p) for p in path)
        fusion = module.fusion if isinstance(module, FusedLinear) else None
        scheme = scheme_for(name) if fusion is None else fused_scheme(name, fusion, scheme_for)
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
            fusion=fusion,
        )
        setattr(parent, str(path[-1]), quantized)
        replaced += 1
    return replaced
