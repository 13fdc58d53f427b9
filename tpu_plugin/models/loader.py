"""Builds a native model and fills it from a Hugging Face safetensors checkpoint.

The model is first built abstractly (``nnx.eval_shape``: shapes only, no memory), then every
parameter is read by its Hugging Face name, checked for shape and cast to the serving dtype
(checkpoints in bf16, fp16 or fp32 all load into any serving dtype). A missing, duplicated or
misshaped tensor stops start-up with its name; nothing is left random.

Fused projections (:class:`tpu_plugin.layers.linear.FusedLinear`: ``self_attn.qkv_proj``,
``mlp.gate_up_proj``, MLA's ``fused_qkv_a_proj``) are found in the model itself, not in a
per-family table: each is built from the checkpoint tensors of its parts, named next to it
(``self_attn.q_proj.weight``, ``k_proj``, ``v_proj``), in the fused layout
(:class:`~tpu_plugin.layers.linear.Fusion`); a checkpoint that already fuses them under the
module's own name with the parts concatenated on axis 0 (Phi-3's ``qkv_proj`` and
``gate_up_proj``) is cut into the parts first, so both layouts load for every family.

The per-model hook ``fused_checkpoint_tensors`` (see
:meth:`tpu_plugin.models.llama.LlamaForCausalLM.fused_checkpoint_tensors`) renames checkpoint
modules or cuts a checkpoint tensor on axis 0 into several parameters (Mixtral's transformers-5
names).

The reverse, for mixture-of-experts ports, is the optional class hook
``stacked_checkpoint_tensors(cfg)``: many checkpoint tensors (one per expert) fill one stacked
``[E, rows, ...]`` parameter. It maps a name pattern, with ``*`` for the expert index, to
``(parameter, first_row, rows)``: ``{"mlp.experts.*.up_proj.weight": ("mlp.experts.gate_up_proj",
I, I)}`` puts ``model.layers.3.mlp.experts.5.up_proj.weight`` into rows ``[I, 2I)`` of
``model.layers.3.mlp.experts.gate_up_proj[5]`` (``rows`` ``None``: all rows). Every expert and
row must be filled exactly once; a gap stops start-up naming the missing checkpoint tensor.
Families differ only in their patterns (:func:`tpu_plugin.layers.moe.expert_stacking_rules`).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from vllm.logger import init_logger

from tpu_plugin.layers.linear import FusedLinear, Fusion, QuantizedLinear, quantize_linears
from tpu_plugin.models import quantization
from tpu_plugin.models.quantization import Quantization, QuantizationError
from tpu_plugin.models.registry import resolve_model_class
from tpu_plugin.models.safetensors_reader import CheckpointError, HostReader, read_on_device

logger = init_logger(__name__)

# Tensors some checkpoints carry that no port needs (buffers, not weights).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Scales that may be stored as one value for a whole tensor (broadcast to their parameter).
_SCALES = ("weight_scale", "input_scale", "k_scale", "v_scale")
# Leaves of quantized checkpoints' tensors; one without a parameter stops start-up.
_QUANTIZED_LEAVES = (
    "weight_scale",
    "weight_packed",
    "weight_zero_point",
    "input_scale",
    "qweight",
    "qzeros",
)


def resolve_model_dir(model: str, revision: str | None = None) -> str:
    """A local directory for ``model``: the path itself, or the Hugging Face cache snapshot."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(model, revision=revision, allow_patterns=["*.safetensors", "*.json"])


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of the checkpoint, in index order when an index exists."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return sorted({os.path.join(model_dir, name) for name in weight_map.values()})
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}")
    return files


def _param_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in path)


def split_targets(
    name: str, fused: dict[str, list[tuple[str, int]]]
) -> list[tuple[str, int | None]]:
    """The parameters checkpoint tensor ``name`` fills, with their rows (``None``: all of it).

    ``model.layers.0.self_attn.qkv_proj.weight`` with ``{"self_attn.qkv_proj": [("self_attn
    .q_proj", 64), …]}`` gives ``[("model.layers.0.self_attn.q_proj.weight", 64), …]``.
    """
    module, _, leaf = name.rpartition(".")
    for key, parts in fused.items():
        if module == key or module.endswith("." + key):
            base = module[: len(module) - len(key)]
            return [(f"{base}{part}.{leaf}", rows) for part, rows in parts]
    return [(name, None)]


def _cut(name: str, tensor: jax.Array, targets: list[tuple[str, int | None]]) -> list[jax.Array]:
    if len(targets) == 1 and targets[0][1] is None:
        return [tensor]
    rows = [r for _, r in targets]
    if sum(rows) != tensor.shape[0]:
        raise CheckpointError(
            f"{name} has {tensor.shape[0]} rows in the checkpoint, but its parts "
            f"({', '.join(t for t, _ in targets)}) need {sum(rows)}"
        )
    bounds = [sum(rows[:i]) for i in range(1, len(rows))]
    return (np if isinstance(tensor, np.ndarray) else jnp).split(tensor, bounds, axis=0)


def _in_dtype(value: Any, dtype: Any, host: bool) -> Any:
    """``value`` as a parameter of ``dtype``: host parameters (MoE offload) stay NumPy and, in
    the file's own dtype, views of the mapped file (one copy later, into the host stack);
    device ones become jax arrays."""
    if host:
        return np.asarray(value).astype(dtype, copy=False)
    return jnp.asarray(value).astype(dtype)


class _Stacker:
    """Collects per-expert checkpoint tensors and stacks them into ``[E, rows, ...]`` params."""

    def __init__(self, rules: dict[str, tuple[str, int, int | None]]):
        self.rules = [
            (
                re.compile(r"^((?:.*\.)?)" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$"),
                pattern,
                target,
                first,
                rows,
            )
            for pattern, (target, first, rows) in rules.items()
        ]
        self.parts: dict[str, dict[tuple[int, int], jax.Array]] = {}  # {(expert, first row): t}
        self.bases: dict[str, str] = {}  # parameter -> the name prefix its patterns matched

    def match(self, name: str) -> tuple[str, int, int, int | None, str] | None:
        """(parameter, expert, first row, rows, base) when ``name`` is a stacked tensor."""
        for regex, _, target, first, rows in self.rules:
            m = regex.match(name)
            if m:
                return m.group(1) + target, int(m.group(2)), first, rows, m.group(1)
        return None

    def add(self, name: str, tensor: jax.Array, hit: tuple, expected: tuple[int, ...]) -> None:
        target, expert, first, rows, base = hit
        want = ((expected[1] - first) if rows is None else rows, *expected[2:])
        if expert >= expected[0] or tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{name} has shape {tuple(tensor.shape)} in the checkpoint, but {target} "
                f"{expected} needs an expert index below {expected[0]} and shape {want}"
            )
        parts = self.parts.setdefault(target, {})
        if (expert, first) in parts:
            raise CheckpointError(f"{name} appears twice in the checkpoint")
        parts[(expert, first)] = tensor
        self.bases[target] = base

    def stacked(self, target: str, expected: tuple[int, ...]) -> jax.Array:
        """The full parameter, or an error naming the missing checkpoint tensors."""
        base, parts = self.bases[target], self.parts[target]
        rules = sorted(
            (first, pattern) for _, pattern, t, first, _ in self.rules if base + t == target
        )
        missing = [
            base + pattern.replace("*", str(e))
            for e in range(expected[0])
            for first, pattern in rules
            if (e, first) not in parts
        ]
        if missing:
            shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
            raise CheckpointError(f"{target} cannot be assembled: the checkpoint lacks {shown}")
        sample = next(iter(parts.values()))
        if isinstance(sample, np.ndarray):
            # Host parts (``load_model``'s ``host``) are views of the memory-mapped file: one
            # copy into the stacked array (a 14.5 GB expert set paid three in stack+concat).
            value = np.empty(expected, sample.dtype)
            for e in range(expected[0]):
                row = 0
                for first, _ in rules:
                    part = parts[(e, first)]
                    value[e, row : row + part.shape[0]] = part
                    row += part.shape[0]
                if row != expected[1]:
                    raise CheckpointError(
                        f"{target}: expert {e}'s tensors have {row} rows, expected {expected}"
                    )
            return value
        value = jnp.stack(
            [jnp.concatenate([parts[(e, first)] for first, _ in rules]) for e in range(expected[0])]
        )
        if tuple(value.shape) != expected:
            raise CheckpointError(
                f"{target}: the per-expert tensors stack to {tuple(value.shape)}, "
                f"expected {expected}"
            )
        return value


class _Fuser:
    """Collects the parts of every fused parameter of the model and fuses them at the end.

    Quantized fused layers (:class:`QuantizedLinear` with a ``fusion``) fuse their scales
    exactly like their weight rows: per-channel ``weight_scale`` ``[rows_i]`` and 4-bit group
    scales / zero points ``[rows_i, K / group]`` are packed by the same :class:`Fusion`, a
    part's per-tensor weight scale is first broadcast to its rows (per-channel, so parts with
    different scales stay exact). A static per-tensor ``input_scale`` (W8A8 static) is one
    number for the one fused matmul: equal parts' scales fuse exactly; parts whose scales
    differ take the largest (vLLM's rule for its fused layers: no part's activations clip,
    the others quantize a little more coarsely than unfused), with a warning.
    """

    LEAVES = ("weight", "bias", "weight_scale", "weight_zero_point", "input_scale")

    def __init__(self, model: nnx.Module, wanted: dict[str, Any]):
        self.fusions: dict[str, Fusion] = {}  # fused parameter -> its layout
        self.part_of: dict[str, tuple[str, int]] = {}  # checkpoint name -> (parameter, part)
        for path, node in nnx.iter_graph(model):
            if isinstance(node, FusedLinear):
                fusion = node.fusion
            elif isinstance(node, QuantizedLinear) and node.fusion is not None:
                fusion = node.fusion
            else:
                continue
            module = _param_name(path)
            parent = module.rpartition(".")[0]
            for leaf in self.LEAVES:
                param = f"{module}.{leaf}"
                if param not in wanted:
                    continue
                self.fusions[param] = fusion
                for i, part in enumerate(fusion.names):
                    self.part_of[f"{parent}.{part}.{leaf}" if parent else f"{part}.{leaf}"] = (
                        param,
                        i,
                    )
        self.parts: dict[str, dict[int, jax.Array]] = {}
        self.sources: dict[str, dict[int, str]] = {}

    def broadcast_scale(self, name: str, tensor: jax.Array) -> jax.Array:
        """A per-tensor ``weight_scale`` of a fused part (or of a checkpoint's own fused
        tensor) as per-channel ``[rows]``; anything else unchanged."""
        if not name.endswith(".weight_scale") or tensor.size != 1:
            return tensor
        if name in self.part_of:
            param, i = self.part_of[name]
            rows = self.fusions[param].parts[i][1]
        elif name in self.fusions:
            rows = self.fusions[name].rows
        else:
            return tensor
        return jnp.broadcast_to(jnp.reshape(tensor, ()), (rows,))

    def take(self, name: str, tensor: jax.Array, wanted: dict[str, Any]) -> bool:
        """Keeps ``name`` when it is a part, or a checkpoint's concatenated fused tensor;
        False when it is neither."""
        if name in self.part_of:
            param, i = self.part_of[name]
            self._add(name, param, i, tensor, wanted)
            return True
        if name in self.fusions and name.endswith(".input_scale"):  # one number, not rows
            for i in range(len(self.fusions[name].parts)):
                self._add(name, name, i, tensor, wanted)
            return True
        if name in self.fusions:
            fusion = self.fusions[name]
            if tensor.shape[0] != fusion.rows:
                raise CheckpointError(
                    f"{name} has {tensor.shape[0]} rows in the checkpoint, but its parts "
                    f"({', '.join(fusion.names)}) need {fusion.rows}"
                )
            for i, part in enumerate(fusion.cut_concatenated(tensor)):
                self._add(name, name, i, part, wanted)
            return True
        return False

    def _add(self, name: str, param: str, i: int, tensor: jax.Array, wanted: dict) -> None:
        value = wanted[param].get_value()
        rows = self.fusions[param].parts[i][1]
        if param.endswith(".input_scale"):
            expected: tuple[int, ...] = ()
            tensor = jnp.reshape(jnp.asarray(tensor), ())
        else:
            expected = (rows, *value.shape[2:]) if len(value.shape) > 2 else (rows,)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"{name} has shape {tuple(tensor.shape)} in the checkpoint, but {param} needs "
                f"{expected} for it; config.json does not match the weights: use the config "
                "saved with them"
            )
        parts = self.parts.setdefault(param, {})
        if i in parts:
            raise CheckpointError(
                f"{name} fills {param} part {self.fusions[param].names[i]}, which "
                f"{self.sources[param][i]} already filled (the checkpoint has it twice)"
            )
        parts[i] = tensor.astype(value.dtype)
        self.sources.setdefault(param, {})[i] = name

    def fused(self, param: str) -> jax.Array:
        """The fused parameter, or an error naming the checkpoint tensors it lacks."""
        fusion, parts = self.fusions[param], self.parts.get(param, {})
        missing = [n for i, n in enumerate(fusion.names) if i not in parts]
        if missing:
            base, _, leaf = param.rpartition(".")
            parent = base.rpartition(".")[0]
            names = ", ".join(f"{parent}.{n}.{leaf}" for n in missing)
            raise CheckpointError(f"{param} cannot be assembled: the checkpoint lacks {names}")
        tensors = [parts[i] for i in range(len(fusion.parts))]
        if param.endswith(".input_scale"):
            scales = jnp.stack(tensors)
            if bool(jnp.any(scales != scales[0])):
                logger.warning(
                    "%s: the parts' static input scales differ (%s); the fused matmul uses "
                    "the largest, as vLLM does",
                    param,
                    ", ".join(
                        f"{n}={float(v):.6g}" for n, v in zip(fusion.names, scales, strict=True)
                    ),
                )
            return jnp.max(scales)
        return fusion.pack(tensors)


# Prefixes a checkpoint may carry around the port's names: base-model checkpoints of decoders
# (embedding models such as Qwen3-Embedding, saved from ``Qwen3Model``) lack ``model.``;
# encoders saved from a task model (``BertForMaskedLM``) add ``bert.`` / ``roberta.``.
_MISSING_PREFIXES = ("model.",)
_EXTRA_PREFIXES = ("bert.", "roberta.", "model.")


def checkpoint_renamer(names: list[str], wanted: set[str]) -> Any:
    """``name -> port name`` for a checkpoint whose tensors sit under a different prefix.

    Decided once for the whole checkpoint (a prefix is added or stripped only where the plain
    names match nothing the port has), so a name never silently lands on a wrong parameter.
    """

    def hits(rename: Any) -> int:
        return sum(rename(n) in wanted for n in names)

    candidates = [lambda n: n]
    candidates += [lambda n, p=p: n if n.startswith(p) else p + n for p in _MISSING_PREFIXES]
    candidates += [lambda n, p=p: n.removeprefix(p) for p in _EXTRA_PREFIXES]
    return max(candidates, key=hits)  # the first best: plain names win ties


def abstract_model(
    hf_config: Any,
    dtype: jnp.dtype,
    quant: Quantization | None = None,
    *,
    drop: tuple[str, ...] = (),
    kv_scales: tuple[str, ...] = (),
    adapt: Callable[[nnx.Module], Any] | None = None,
) -> nnx.Module:
    """The architecture's flax model as shapes only (``nnx.eval_shape``, no memory), as
    ``quant`` lays it out: without the top-level modules named in ``drop``, its linear layers
    quantized (``layers.linear.quantize_linears``), and ``k_scale`` / ``v_scale`` parameters on
    the attention modules named in ``kv_scales`` (``model.layers.0.self_attn.k_scale``, an fp8
    cache's scales from the checkpoint). What :func:`load_model` fills, and what the TPU
    planner (``tpu_plugin.tools.tpu_aot``) compiles with abstract parameters, so the planner
    compiles the parameters serving loads. ``adapt`` is called with the model last, before it
    is made abstract (the planner's LoRA slots: the runner adds them to the loaded model,
    runner/lora.py)."""
    model_class = resolve_model_class(list(hf_config.architectures or []))

    def build() -> nnx.Module:
        model = model_class(hf_config, dtype)
        for name in drop:
            if getattr(model, name, None) is not None:
                delattr(model, name)
        if quant is not None and quant.groups:
            if not quantize_linears(model, quant.scheme_for):
                raise QuantizationError(
                    f"the {quant.method} checkpoint quantizes none of "
                    f"{model_class.__name__}'s linear layers; check its quantization_config"
                )
        for name in kv_scales:
            module = _module_at(model, name.rpartition(".")[0])
            if module is not None and (
                getattr(module, "q_proj", None) is not None
                or getattr(module, "qkv_proj", None) is not None
            ):
                setattr(module, name.rpartition(".")[2], nnx.Param(jnp.ones((), jnp.float32)))
        if adapt is not None:
            adapt(model)
        return model

    return nnx.eval_shape(build)


def _module_at(model: nnx.Module, path: str) -> Any:
    node: Any = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part, None)
        if node is None:
            return None
    return node


def _kv_scale_name(name: str) -> str | None:
    """``self_attn.k_scale`` (or the older ``self_attn.k_proj.output_scale``) -> the
    parameter name of an fp8 cache's scale, else None."""
    for kv in ("k", "v"):
        for suffix in (f"self_attn.{kv}_scale", f"self_attn.{kv}_proj.output_scale"):
            if name.endswith(suffix):
                return name[: len(name) - len(suffix)] + f"self_attn.{kv}_scale"
    return None


def load_model(
    model_dir: str,
    hf_config: Any,
    dtype: jnp.dtype,
    *,
    drop: tuple[str, ...] = (),
    quant: Quantization | None = None,
    host: Callable[[str], bool] | None = None,
) -> nnx.Module:
    """The architecture's flax model with the checkpoint's weights, in ``dtype``.

    ``drop`` names top-level modules the caller never runs (a pooling model's ``lm_head``):
    they are removed before loading, so the checkpoint need not have them. ``quant``
    (``models/quantization.py``): quantized linear layers and an fp8 cache's scales; each
    checkpoint tensor passes through its :meth:`Quantization.convert` first. Parameters whose
    name ``host`` accepts are read into host memory as NumPy arrays and never touch the
    device (MoE offload's routed experts, which may not fit there: runner/expert_cache.py).
    """
    on_host = host or (lambda name: False)
    model_class = resolve_model_class(list(hf_config.architectures or []))
    quant = quant or Quantization()
    # the model first: its configuration errors (before any file) name the config's problem
    plain = nnx.split(abstract_model(hf_config, dtype, drop=drop))[1]
    files = checkpoint_files(model_dir)
    names: list[str] = []
    for file in files:
        with safe_open(file, framework="flax") as reader:
            names += list(reader.keys())  # noqa: SIM118 (safe_open is not a dict)
    rename = checkpoint_renamer(names, {_param_name(p) for p, _ in nnx.to_flat_state(plain)})
    kv_scales = ()
    if quant.kv_cache_dtype is not None:
        kv_scales = tuple(sorted({n for n in map(_kv_scale_name, map(rename, names)) if n}))
    abstract = abstract_model(hf_config, dtype, quant, drop=drop, kv_scales=kv_scales)
    # Schemes apply to the quantized linear layers only: a config's "Linear" target must not
    # quantize an embedding or a norm whose name the scheme's patterns happen to match.
    schemes: dict[str, Any] = {}
    for path, module in nnx.iter_modules(abstract):
        if isinstance(module, QuantizedLinear):
            schemes[_param_name(path)] = module.scheme
            if module.fusion is not None:  # the checkpoint names the parts (q_proj, …)
                parent = _param_name(path).rpartition(".")[0]
                for part in module.fusion.names:
                    schemes[f"{parent}.{part}" if parent else part] = module.scheme
    graphdef, state = nnx.split(abstract)
    wanted = {_param_name(path): leaf for path, leaf in nnx.to_flat_state(state)}
    fused = model_class.fused_checkpoint_tensors(hf_config)
    stacked_hook = getattr(model_class, "stacked_checkpoint_tensors", None)
    stacker = _Stacker(stacked_hook(hf_config) if stacked_hook else {})
    fuser = _Fuser(abstract, wanted)

    loaded: dict[str, jax.Array] = {}
    unexpected: list[str] = []

    def place(name: str, tensor: jax.Array) -> None:
        targets = split_targets(name, fused)
        for (target, _), part in zip(targets, _cut(name, tensor, targets), strict=True):
            if not on_host(target):  # host parameters stay NumPy (MoE offload)
                part = fuser.broadcast_scale(target, jnp.asarray(part))
            if fuser.take(target, part, wanted):
                continue
            if target not in wanted:
                unexpected.append(target)
                continue
            if target in loaded:
                raise CheckpointError(f"{target} appears twice in checkpoint {model_dir}")
            expected = tuple(wanted[target].get_value().shape)
            if tuple(part.shape) != expected and part.size == 1 and target.endswith(_SCALES):
                part = jnp.broadcast_to(jnp.reshape(part, ()), expected)  # per-tensor scale
            if tuple(part.shape) != expected:
                raise CheckpointError(
                    f"{target} has shape {tuple(part.shape)} in the checkpoint, but "
                    f"{model_class.__name__} expects {expected}; config.json "
                    "does not match the weights: use the config saved with them"
                )
            # the parameter's dtype: ``dtype``, except for the few a port keeps in float32
            # (e.g. a router's correction bias) and the quantized layers' own types
            loaded[target] = _in_dtype(part, wanted[target].get_value().dtype, on_host(target))

    for file in files:
        host_reader = HostReader(file)
        with safe_open(file, framework="flax") as reader:
            for stored in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = _kv_scale_name(rename(stored)) or rename(stored)
                module = name.rpartition(".")[0]
                scheme = schemes.get(module)
                hit = stacker.match(name)
                if hit is not None and hit[0] in wanted:
                    if quant.groups and quant.scheme_for(module) is not None:
                        raise QuantizationError(
                            f"{name}: quantized MoE experts are not supported by tpu-plugin "
                            "yet; add the experts to the quantization config's ignore list "
                            "(keep them bf16) or use a bf16 checkpoint"
                        )
                    expected = tuple(wanted[hit[0]].get_value().shape)
                    host = on_host(hit[0])
                    tensor = _in_dtype(
                        host_reader.get_tensor(stored)
                        if host
                        else read_on_device(reader, host_reader, stored),
                        wanted[hit[0]].get_value().dtype,
                        host,
                    )
                    stacker.add(name, tensor, hit, expected)
                    continue
                targets = split_targets(name, fused)
                if scheme is None and not any(
                    t in wanted or t in fuser.part_of or t in fuser.fusions for t, _ in targets
                ):
                    if not name.endswith(_IGNORED_SUFFIXES) and _kv_scale_name(name) is None:
                        unexpected.append(name)
                    continue
                if any(on_host(t) for t, _ in targets):
                    tensor = host_reader.get_tensor(stored)
                else:
                    tensor = read_on_device(reader, host_reader, stored)
                for part_name, value in quant.convert(name, tensor, scheme).items():
                    place(part_name, value)

    for target in stacker.parts:
        if target in loaded:
            raise CheckpointError(
                f"{target} appears twice in checkpoint {model_dir} (fused and per expert)"
            )
        loaded[target] = stacker.stacked(target, tuple(wanted[target].get_value().shape))

    for target in fuser.fusions:
        loaded[target] = fuser.fused(target)

    missing = sorted(set(wanted) - set(loaded))
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise CheckpointError(
            f"checkpoint {model_dir} lacks {len(missing)} tensor(s): {shown}; it is incomplete "
            "or not saved for this architecture: re-download or re-save it"
        )
    # Tied embeddings: checkpoints often still carry lm_head.weight; it is the embedding.
    unexpected = [n for n in unexpected if n != "lm_head.weight"]
    quantized = [n for n in unexpected if n.endswith(_QUANTIZED_LEAVES)]
    if quantized:  # never multiply quantized values as if they were plain weights
        shown = ", ".join(quantized[:3]) + (" …" if len(quantized) > 3 else "")
        raise QuantizationError(
            f"checkpoint {model_dir} has quantized tensors with no quantized layer in "
            f"{model_class.__name__} ({shown}); supported: {quantization.TAKEN}"
        )
    if unexpected:
        logger.warning(
            "ignoring %d checkpoint tensors with no parameter: %s",
            len(unexpected),
            ", ".join(unexpected[:5]),
        )

    flat = [
        (path, leaf.replace(loaded[_param_name(path)])) for path, leaf in nnx.to_flat_state(state)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
