"""Quantized checkpoints and KV caches: the one place that knows the on-disk formats.

What it decides, from vLLM's config (``--quantization``, ``--kv-cache-dtype``) and the
checkpoint's ``quantization_config``:

- which linear layers are quantized and how (:class:`Scheme`: 8-bit int8 / e4m3 weights with a
  scale per output row, optionally W8A8 activations; 4-bit int weights in groups);
- how each format's tensors become the parameters of :mod:`tpu_plugin.layers.linear`'s
  quantized layers (:meth:`Quantization.convert`, called by the loader for every tensor);
- the KV cache's dtype (e4m3 for ``fp8``) and its per-layer scales (``self_attn.k_scale`` /
  ``v_scale`` of the checkpoint; 1.0 without them, as vLLM does).

Formats taken (``--quantization`` or the checkpoint's ``quant_method``):

- ``fp8`` on a bf16 / fp16 / fp32 checkpoint: e4m3 weights with per-row scales made at load
  (weight-only);
- ``compressed-tensors`` ``float-quantized`` / ``int-quantized`` / ``naive-quantized``: FP8 or
  INT8 weights with channel or tensor scales, activations none (W8A16), dynamic per token or
  static per tensor (W8A8);
- ``compressed-tensors`` ``pack-quantized``: INT4 weights in groups, symmetric or with zero
  points (W4A16), and INT8 weights with channel or tensor scales (W8A16, four to an int32);
- ``awq`` (GEMM): INT4 ``qweight`` / ``qzeros`` / ``scales`` in groups (W4A16, zero points).

Anything else stops at start-up naming what is taken. Why not qwix: qwix quantizes a flax
model's weights itself (its PTQ rules intercept ``nnx.Linear``/``einsum`` calls and store its
own ``QArray`` layout); serving a checkpoint quantized by someone else needs that checkpoint's
exact values and scales mapped to parameters, and the matmul itself is this project's kernel
family (``tpu_kernels.quantized_matmul``), which qwix does not call. Only the online ``fp8``
path could use it, and there the per-row absmax quantization is four lines
(``quantize_per_channel``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tpu_kernels.quantized_matmul.reference import quantize_per_channel

TAKEN = (
    "fp8 (--quantization fp8), compressed-tensors (FP8/INT8 W8A16 and W8A8 with channel or "
    "tensor scales, INT8 W8A16 and INT4 W4A16 groups pack-quantized), awq (INT4 GEMM)"
)
KV_CACHE_DTYPES = {"auto": None, "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's nibble order within an int32


class QuantizationError(ValueError):
    """An unsupported quantization; the message names what is taken."""


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How one linear layer is quantized (static: part of the compiled program).

    ``weight``: ``"int8"``, ``"float8_e4m3fn"`` or ``"int4"``; ``activation``: ``None``
    (weight-only) or the weight's 8-bit type (W8A8); ``static_input_scale``: W8A8 with the
    checkpoint's per-tensor ``input_scale`` instead of per-row dynamic scales; ``group_size`` and
    ``zero_point``: 4-bit groups. ``online``: the checkpoint holds full-precision weights,
    quantized at load.
    """

    weight: str
    activation: str | None = None
    static_input_scale: bool = False
    group_size: int | None = None
    zero_point: bool = False
    online: bool = False

    @property
    def bits(self) -> int:
        return 4 if self.weight == "int4" else 8


@dataclasses.dataclass(frozen=True)
class Quantization:
    """The model's quantization: schemes by module name, the format, the KV cache dtype."""

    method: str | None = None
    format: str | None = None
    groups: tuple[tuple[tuple[str, ...], Scheme], ...] = ()  # (targets, scheme)
    ignore: tuple[str, ...] = ()
    kv_cache_dtype: Any = None  # jnp dtype, or None: the model's dtype

    def scheme_for(self, module: str) -> Scheme | None:
        """The scheme of linear layer ``module`` (``model.layers.0.mlp.up_proj``), or None."""
        if any(_matches(pattern, module) for pattern in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(t == "Linear" or _matches(t, module) for t in targets):
                return scheme
        return None

    def convert(self, name: str, tensor: jax.Array, scheme: Scheme | None) -> dict[str, Any]:
        """The parameters checkpoint tensor ``name`` of a quantized layer stands for.

        Returns ``{parameter name: value}`` (usually one entry, the same name); the loader
        shape-checks and places them. ``scheme`` is the layer's (None: not quantized).
        """
        module, _, leaf = name.rpartition(".")
        if scheme is None:
            return {name: tensor}
        if scheme.online:
            if leaf != "weight":
                return {name: tensor}
            q, scale = quantize_per_channel(jnp.asarray(tensor), jnp.dtype(scheme.weight))
            return {name: q, f"{module}.weight_scale": scale}
        if self.method == "awq":
            return _awq(module, leaf, tensor, scheme)
        if leaf == "weight_packed":  # compressed-tensors pack-quantized: int32 words
            return {f"{module}.weight": _unpack_int32_rows(tensor, scheme)}
        if leaf == "weight_zero_point" and scheme.weight == "int4":
            # packed over the output rows: [N / 8, K / g] int32
            return {name: _unpack_int32_rows(jnp.asarray(tensor).T, scheme).T}
        if leaf == "weight_shape":
            return {}
        if leaf == "weight_zero_point":
            if np.any(np.asarray(tensor)):
                raise QuantizationError(f"{name}: asymmetric 8-bit weights are not supported")
            return {}
        if leaf == "weight_scale" and scheme.weight != "int4":
            return {name: jnp.asarray(tensor, jnp.float32).reshape(-1)}  # [N, 1] / [1] -> rows
        if leaf == "input_scale":
            return {name: jnp.asarray(tensor, jnp.float32).reshape(())}
        return {name: tensor}


def _matches(pattern: str, module: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return module == pattern or module.endswith("." + pattern)


def _unpack_int32_rows(words: jax.Array, scheme: Scheme) -> jax.Array:
    """compressed-tensors' pack-quantized ``[rows, K / (32 / b)]`` int32 for ``b``-bit values
    (element ``n i + j`` of ``n = 32 / b`` in bits ``b j``), offset by ``2^(b - 1)``: 4-bit
    symmetric weights become int4, asymmetric ones uint4; 8-bit ones (W8A16) int8."""
    bits = scheme.bits
    words = np.asarray(words).astype(np.uint32)
    shifts = bits * np.arange(32 // bits, dtype=np.uint32)
    fields = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    values = fields.reshape(*words.shape[:-1], -1).astype(np.int16)
    if bits == 8:
        return jnp.asarray(values - 128, jnp.int8)
    if scheme.zero_point:
        return jnp.asarray(values, jnp.uint4)
    return jnp.asarray(values - 8, jnp.int4)


def _unpack_awq(words: jax.Array) -> np.ndarray:
    """AutoAWQ's ``[rows, cols / 8]`` int32 -> ``[rows, cols]`` uint4 values."""
    words = np.asarray(words).astype(np.uint32)
    shifts = 4 * np.asarray([AWQ_ORDER.index(j) for j in range(8)], np.uint32)
    nibbles = (words[..., None] >> shifts) & 0xF
    return nibbles.reshape(*words.shape[:-1], -1).astype(np.uint8)


def _awq(module: str, leaf: str, tensor: jax.Array, scheme: Scheme) -> dict[str, Any]:
    """AWQ GEMM tensors (``[K, N]`` orientation) -> the ``[N, K]`` parameters."""
    if leaf == "qweight":  # [K, N / 8]
        return {f"{module}.weight": jnp.asarray(_unpack_awq(tensor).T, jnp.uint4)}
    if leaf == "qzeros":  # [K / g, N / 8]
        return {f"{module}.weight_zero_point": jnp.asarray(_unpack_awq(tensor).T, jnp.uint4)}
    if leaf == "scales":  # [K / g, N]
        return {f"{module}.weight_scale": jnp.asarray(tensor, jnp.float32).T}
    return {f"{module}.{leaf}": tensor}


# ---------------------------------------------------------------- from vLLM's config


def from_config(hf_config: Any, method: str | None, kv_cache_dtype: str | None) -> Quantization:
    """The quantization of a model: ``method`` is vLLM's ``model_config.quantization``."""
    kv = _kv_dtype(kv_cache_dtype or "auto")
    if method is None:
        return Quantization(kv_cache_dtype=kv)
    if method == "fp8":
        qc = getattr(hf_config, "quantization_config", None)
        if qc:  # a checkpoint vLLM reads as "fp8": its own serialized FP8 format
            raise QuantizationError(
                "fp8 checkpoints in vLLM's own serialized format are not supported by "
                f"tpu-plugin; supported: {TAKEN}"
            )
        scheme = Scheme("float8_e4m3fn", online=True)
        return Quantization("fp8", None, ((("Linear",), scheme),), ("lm_head",), kv)
    qc = _as_dict(getattr(hf_config, "quantization_config", None))
    if method == "compressed-tensors":
        return _compressed_tensors(qc, kv)
    if method == "awq":
        return _awq_config(qc, kv)
    raise QuantizationError(f"quantization {method!r} is not supported by tpu-plugin; {TAKEN}")


def _kv_dtype(name: str) -> Any:
    if name not in KV_CACHE_DTYPES:
        raise QuantizationError(
            f"--kv-cache-dtype {name} is not supported by tpu-plugin; use auto or fp8 (e4m3)"
        )
    return KV_CACHE_DTYPES[name]


def _as_dict(qc: Any) -> dict:
    if qc is None:
        return {}
    return qc if isinstance(qc, dict) else qc.to_dict()


def _compressed_tensors(qc: dict, kv: Any) -> Quantization:
    fmt = qc.get("format")
    groups = []
    for name, group in (qc.get("config_groups") or {}).items():
        scheme = _ct_scheme(name, group, group.get("format") or fmt)
        if scheme is not None:
            groups.append((tuple(group.get("targets") or ()), scheme))
    return Quantization("compressed-tensors", fmt, tuple(groups), tuple(qc.get("ignore") or ()), kv)


def _ct_scheme(name: str, group: dict, fmt: str | None) -> Scheme | None:
    weights = group.get("weights")
    if weights is None:
        return None
    acts = group.get("input_activations")
    bits, kind = weights.get("num_bits"), weights.get("type")
    strategy = weights.get("strategy")
    where = f"compressed-tensors group {name!r} ({kind} {bits}-bit, strategy {strategy})"
    if bits == 8 and kind in ("float", "int") and strategy in ("channel", "tensor"):
        if not weights.get("symmetric", True):
            raise QuantizationError(f"{where}: asymmetric 8-bit weights are not supported")
        weight = "float8_e4m3fn" if kind == "float" else "int8"
        if fmt == "pack-quantized" and (kind != "int" or acts is not None):
            raise QuantizationError(
                f"{where}: pack-quantized 8-bit weights are supported as int W8A16 only"
            )
        if acts is None:  # int8 W8A16 comes packed (vLLM's parser takes it only so)
            return Scheme(weight)
        if acts.get("num_bits") != 8 or acts.get("type") != kind:
            raise QuantizationError(f"{where}: activations must be {kind} 8-bit like the weights")
        if acts.get("dynamic") and acts.get("strategy") == "token":
            return Scheme(weight, activation=weight)
        if not acts.get("dynamic") and acts.get("strategy") == "tensor":
            return Scheme(weight, activation=weight, static_input_scale=True)
        raise QuantizationError(
            f"{where}: activations must be dynamic per token or static per tensor"
        )
    if bits == 4 and kind == "int" and strategy == "group" and acts is None:
        if fmt != "pack-quantized":
            raise QuantizationError(f"{where}: 4-bit weights must be pack-quantized, got {fmt!r}")
        return Scheme(
            "int4",
            group_size=int(weights["group_size"]),
            zero_point=not weights.get("symmetric", True),
        )
    raise QuantizationError(f"{where} is not supported by tpu-plugin; supported: {TAKEN}")


def _awq_config(qc: dict, kv: Any) -> Quantization:
    version = str(qc.get("version", "gemm")).lower()
    if qc.get("bits", qc.get("w_bit")) != 4 or version != "gemm":
        raise QuantizationError(
            f"AWQ with {qc.get('bits')} bits, version {version!r} is not supported; "
            "tpu-plugin takes 4-bit GEMM AWQ"
        )
    scheme = Scheme(
        "int4",
        group_size=int(qc.get("group_size", qc.get("q_group_size", 128))),
        zero_point=bool(qc.get("zero_point", True)),
    )
    ignore = tuple(qc.get("modules_to_not_convert") or ()) + ("lm_head",)
    return Quantization("awq", "gemm", ((("Linear",), scheme),), ignore, kv)
