"""LoRA in the model runner: vLLM's manager decides, device slots hold, each step maps tokens.

* Decisions are vLLM's own: ``LRUCacheWorkerLoRAManager`` (the GPU runner's) loads adapters
  (PEFT config and rank checks, the safetensors read, unexpected modules), keeps up to
  ``--max-cpu-loras`` of them on the host and up to ``--max-loras`` in device slots, both LRU,
  with pinning; its model manager ``LRUCacheLoRAModelManager`` picks the slot. What is not
  framework-neutral in them is replaced, not copied: the model manager's constructor and
  ``_add_adapter`` wrap a PyTorch model's layers and pack torch tensors, so
  :class:`SlotManager` builds only its bookkeeping and turns an adapter into padded slot rows
  (checked against this model's shapes); ``activate_adapter`` then writes those rows into the
  slot vLLM chose (:class:`SlotWriter`, one jitted in-place update of every projection).
* The device side is :mod:`tpu_plugin.layers.lora`: fixed-shape slots in the parameter tree,
  so adapters come and go without recompiling.
* Each step (:meth:`LoRARunner.step_slots`) activates the step's adapters and gives every token
  its slot (``StepInputs.lora_slots``; ``-1`` for base-model requests and padding). A step
  without adapters keeps ``lora_slots=None`` and runs the base model's program unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from flax import nnx
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.lora.lora_model import LoRAModel
from vllm.lora.model_manager import AdapterLRUCache, LRUCacheLoRAModelManager
from vllm.lora.request import LoRARequest
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from tpu_plugin.layers.linear import QuantizedLinear
from tpu_plugin.layers.lora import TARGET_MODULES, LoRATarget, attach_slots

logger = init_logger(__name__)

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class AdapterMismatchError(ValueError):
    """The adapter does not fit this base model (trained for another one); the message says
    which module and which shapes."""


def check_lora_config(vllm_config: VllmConfig) -> None:
    """Start-up checks of ``--enable-lora`` (each error names the fix)."""
    from tpu_plugin.models.registry import select_implementation

    lora = vllm_config.lora_config
    model = vllm_config.model_config
    if lora is None or model is None:
        return
    if select_implementation(list(model.architectures or []))[0] != "jax":
        raise ValueError(
            "tpu-plugin serves LoRA adapters on its native JAX models only, not through "
            "torchax; drop --enable-lora or serve a model with a JAX port"
        )
    if model.runner_type != "generate":
        raise ValueError(
            "tpu-plugin serves LoRA adapters for generative models only; drop --enable-lora"
        )
    if lora.fully_sharded_loras:
        raise ValueError(
            "tpu-plugin shards adapters like the base weights they change (A split where the "
            "weight's input is, B where its output is); drop --fully-sharded-loras"
        )
    if lora.lora_dtype not in ("auto", None, model.dtype):
        name = str(lora.lora_dtype).removeprefix("torch.")
        raise ValueError(
            f"tpu-plugin keeps adapters in the model's dtype "
            f"({str(model.dtype).removeprefix('torch.')}); drop --lora-dtype {name} or serve "
            "the model in that dtype"
        )
    # Options of vLLM's torch LoRA layers with no counterpart here: refused, never ignored.
    ignored = {
        "--default-mm-loras": lora.default_mm_loras,
        "--enable-tower-connector-lora": lora.enable_tower_connector_lora,
        "--specialize-active-lora": lora.specialize_active_lora,
        "--enable-mixed-moe-lora-format": lora.enable_mixed_moe_lora_format,
        "--enable-moe-shared-loras": lora.enable_moe_shared_loras,
        "--max-lora-cls-labels": lora.max_lora_cls_labels,
    }
    used = [flag for flag, value in ignored.items() if value]
    if used:
        raise ValueError(
            f"tpu-plugin's LoRA adapts the dense projections of text models only (MoE experts, "
            f"vision towers and classification heads are not adapted); drop {', '.join(used)}"
        )
    unknown = sorted(set(lora.target_modules or ()) - set(TARGET_MODULES))
    if unknown:
        raise ValueError(
            f"--lora-target-modules {', '.join(unknown)}: tpu-plugin applies LoRA to "
            f"{', '.join(TARGET_MODULES)}; pick among them"
        )
    parallel = vllm_config.parallel_config
    if parallel.distributed_executor_backend not in (None, "mp", "uni"):
        raise ValueError(
            "tpu-plugin serves LoRA adapters in single-process engines only; drop "
            f"--distributed-executor-backend {parallel.distributed_executor_backend}"
        )


class SlotWriter:
    """Writes one adapter's rows into slot ``s`` of every projection's ``a`` / ``b``, in place.

    One jitted program (donated arrays, the slot a traced index) for every write: filling or
    replacing an adapter never compiles anything after the first write.
    """

    def __init__(self, targets: list[LoRATarget], params: nnx.State):
        flat = dict(nnx.to_flat_state(params))
        self.variables = [
            (flat[(*t.path, "lora", "a")], flat[(*t.path, "lora", "b")]) for t in targets
        ]
        shardings = [(a.get_value().sharding, b.get_value().sharding) for a, b in self.variables]
        self.dtype = self.variables[0][0].get_value().dtype
        self._program = jax.jit(_write_rows, donate_argnums=(0,), out_shardings=shardings)

    def write(self, slot: int, rows: list[tuple[np.ndarray, np.ndarray]]) -> None:
        values = [(a.get_value(), b.get_value()) for a, b in self.variables]
        new = self._program(values, np.int32(slot), rows)
        for (a, b), (new_a, new_b) in zip(self.variables, new, strict=True):
            a.set_value(new_a)
            b.set_value(new_b)


def _write_rows(values: list, slot: jax.Array, rows: list) -> list:
    out = []
    for (a, b), (row_a, row_b) in zip(values, rows, strict=True):
        a = jax.lax.dynamic_update_index_in_dim(a, row_a.astype(a.dtype), slot, 0)
        b = jax.lax.dynamic_update_index_in_dim(b, row_b.astype(b.dtype), slot, b.ndim - 2)
        out.append((a, b))
    return out


class SlotManager(LRUCacheLoRAModelManager):
    """vLLM's LRU adapter manager over the device slots of :mod:`tpu_plugin.layers.lora`.

    The constructor sets only the bookkeeping vLLM's methods use (the base constructor wraps a
    PyTorch model's layers, which does not exist here). vLLM's ``activate_adapter`` chooses
    the slot (evicting the least recently used unpinned one); this class writes the rows.
    """

    def __init__(self, vllm_config: VllmConfig, targets: list[LoRATarget], max_layers: int):
        lora_config = vllm_config.lora_config
        self.lora_config = lora_config
        self.model = None  # no torch model: no weight-name mapper, no skipped prefixes
        self.supported_lora_modules = list(TARGET_MODULES)
        self.packed_modules_mapping: dict[str, list[str]] = {}
        self.modules: dict[str, Any] = {}  # torch LoRA layers: none
        self.moe_ep_load_spec = None
        self.is_pooling_model = False
        self._enable_mixed_moe_lora_format = False
        self._classification_head = None
        self._pooling_task = None
        self._registered_adapters = AdapterLRUCache(self.capacity, self._forget)
        self._active_adapters = AdapterLRUCache(self.lora_slots, self._deactivate_adapter)
        self.lora_index_to_id: list[int | None] = [None] * self.lora_slots
        self._last_mapping = None
        self._last_slot_layout = None
        self.targets = targets
        self.max_layers = max_layers
        self.max_rank = lora_config.max_lora_rank
        self.enabled = set(lora_config.target_modules or TARGET_MODULES)
        self.part_of = {
            name: (i, part)
            for i, target in enumerate(targets)
            for name, (part, _) in zip(target.module_names(), target.parts, strict=True)
        }
        self.rows: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.writer: SlotWriter | None = None

    def _forget(self, lora_id: int) -> None:
        self.deactivate_adapter(lora_id)
        self.rows.pop(lora_id, None)

    def check(self, lora: LoRAModel, name: str) -> None:
        """Raises :class:`AdapterMismatchError` unless every module of ``lora`` is a target of
        this model with matching shapes (the adapter was trained for this base model)."""
        for module, weights in lora.loras.items():
            found = self.part_of.get(module)
            if found is None:
                layer = _LAYER.search(f".{module}.")
                if layer and int(layer.group(1)) >= self.max_layers:
                    why = f"the base model has {self.max_layers} layers"
                else:
                    why = "the base model has no such projection"
                raise AdapterMismatchError(
                    f"LoRA adapter {name!r} changes {module}, but {why}: it was trained for "
                    "another base model; load an adapter trained for this one"
                )
            target = self.targets[found[0]]
            rows = dict(target.parts)[found[1]]
            a, b = tuple(weights.lora_a.shape), tuple(weights.lora_b.shape)
            if a[1] != target.in_features or b[0] != rows or a[0] != b[1]:
                raise AdapterMismatchError(
                    f"LoRA adapter {name!r}: {module} has lora_A {a} and lora_B {b}, but the "
                    f"base model's projection maps {target.in_features} inputs to {rows} "
                    "outputs: it was trained for another base model; load an adapter trained "
                    "for this one"
                )

    def _add_adapter(self, lora: LoRAModel) -> None:
        """Registers ``lora`` as padded slot rows (vLLM's version packs torch tensors)."""
        parts: list[dict[str, tuple[np.ndarray, np.ndarray, float]]] = [{} for _ in self.targets]
        for module, weights in lora.loras.items():
            index, part = self.part_of[module]
            if part in self.enabled:  # --lora-target-modules leaves the others out
                parts[index][part] = (
                    weights.lora_a.float().numpy(),
                    weights.lora_b.float().numpy(),
                    float(weights.scaling),
                )
        dtype = self.writer.dtype if self.writer is not None else np.float32
        self.rows[lora.id] = [
            tuple(np.asarray(x, dtype) for x in target.pack(weights, self.max_rank))
            for target, weights in zip(self.targets, parts, strict=True)
        ]
        self._registered_adapters[lora.id] = lora

    def activate_adapter(self, lora_id: int) -> bool:
        activated = super().activate_adapter(lora_id)  # vLLM: the slot, evictions
        if activated:
            self.writer.write(self.slot_of(lora_id), self.rows[lora_id])
        return activated

    def slot_of(self, lora_id: int) -> int:
        return self.lora_index_to_id.index(lora_id)


class WorkerManager(LRUCacheWorkerLoRAManager):
    """vLLM's worker-side LRU manager over a :class:`SlotManager`; loading adds the shape
    check against this base model (vLLM's torch layers check shapes when they copy)."""

    def __init__(self, vllm_config: VllmConfig, slots: SlotManager):
        super().__init__(vllm_config, device="cpu", embedding_modules={})
        self._adapter_manager = slots

    def _load_adapter(self, lora_request: LoRARequest) -> LoRAModel:
        lora = super()._load_adapter(lora_request)
        self._adapter_manager.check(lora, lora_request.lora_name)
        return lora


class LoRARunner:
    """The runner's LoRA state: the manager, which adapter each request uses, the slot writer."""

    def __init__(self, vllm_config: VllmConfig, model: nnx.Module, dtype: Any):
        lora_config = vllm_config.lora_config
        modules = tuple(lora_config.target_modules or TARGET_MODULES)
        quantized = [
            ".".join(map(str, path))
            for path, module in nnx.iter_graph(model)
            if isinstance(module, QuantizedLinear)
        ]
        if quantized:  # attach_slots adapts plain Linear layers only: refuse, not skip
            raise ValueError(
                f"LoRA on a quantized model is not supported by tpu-plugin yet ({quantized[0]} "
                "is quantized): serve the unquantized checkpoint with --enable-lora, or drop "
                "--enable-lora"
            )
        self.max_loras = lora_config.max_loras
        self.targets = attach_slots(
            model, lora_config.max_loras, lora_config.max_lora_rank, dtype, modules
        )
        if not self.targets:
            raise ValueError(
                f"{type(model).__name__} has no projection named {', '.join(modules)} to adapt; "
                "drop --enable-lora"
            )
        num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        self.slots = SlotManager(vllm_config, self.targets, num_layers)
        self.manager = WorkerManager(vllm_config, self.slots)
        self.requests: dict[str, LoRARequest] = {}

    def bind(self, params: nnx.State) -> None:
        """Finds the slots in the (sharded) parameters; compiles the slot write once."""
        self.slots.writer = writer = SlotWriter(self.targets, params)
        zeros = [
            (np.zeros(a.get_value().shape[1:], writer.dtype), np.zeros(_b_row(b), writer.dtype))
            for a, b in writer.variables
        ]
        writer.write(0, zeros)

    def track(self, scheduler_output: Any) -> None:
        """Remembers new requests' adapters and forgets finished requests."""
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            if new.lora_request is not None:
                self.requests[new.req_id] = new.lora_request

    def step_slots(self, step: Any, req_ids: list[str], num_scheduled: list[int]) -> Any:
        """``step`` with every token's slot, after activating the step's adapters (vLLM's
        manager loads, evicts and assigns slots); unchanged when no request has one."""
        loras = [self.requests.get(r) for r in req_ids]
        if not any(loras):
            return step
        self.manager.set_active_adapters({lora for lora in loras if lora is not None}, None)
        per_request = np.fromiter(
            (-1 if lora is None else self.slots.slot_of(lora.lora_int_id) for lora in loras),
            np.int32,
            len(loras),
        )
        tokens = np.full(step.input_ids.shape[0], -1, np.int32)
        tokens[: sum(num_scheduled)] = np.repeat(per_request, num_scheduled)
        return step._replace(lora_slots=jax.device_put(tokens))

    def check_adapter(self, lora_request: LoRARequest) -> str | None:
        """Why ``lora_request`` cannot be served (vLLM's checks and the shape check), or None.

        Loads and checks only; nothing is registered (the API server's 400s, lora_api.py).
        """
        from vllm.exceptions import VLLMNotFoundError

        try:
            self.manager._load_adapter(lora_request)
        except VLLMNotFoundError:  # no such adapter: vLLM's handler answers its 404
            return None
        except (ValueError, FileNotFoundError) as error:  # the adapter, not the engine
            return str(error)
        return None


def _b_row(b: Any) -> tuple[int, ...]:
    shape = b.get_value().shape
    return (*shape[:-2], shape[-1])


def step_variants(step: Any, lora: bool) -> list[Any]:
    """The forward programs of one bucket: ``step`` itself and, with ``--enable-lora``, its
    LoRA version (every token's slot -1): start-up precompiles both, as does the planner."""
    if not lora:
        return [step]
    slots = jax.device_put(np.full(step.input_ids.shape[0], -1, np.int32))
    return [step, step._replace(lora_slots=slots)]
