"""Every ``TPU_PLUGIN_*`` environment variable, read in one place.

Values are read when asked for (not cached at import), because vLLM starts several processes
and the ``--device`` flag is turned into ``TPU_PLUGIN_DEVICE`` before the engine starts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

DEVICES = ("tpu", "cpu", "gpu")
MODEL_IMPLS = ("auto", "jax", "torchax")
ATTENTION_IMPLS = ("auto", "xla", "reference", "pallas", "pallas-interpret")
MOE_IMPLS = ("auto", "xla", "reference", "pallas", "pallas-interpret")
QUANTIZED_MATMUL_IMPLS = ("auto", "reference", "pallas", "pallas-interpret")


def _choice(name: str, valid: tuple[str, ...], default: str | None) -> str | None:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(valid)}")
    return value


def device() -> str | None:
    """``TPU_PLUGIN_DEVICE``: tpu|cpu|gpu; the JAX backend to run on (set by ``--device``)."""
    return _choice("TPU_PLUGIN_DEVICE", DEVICES, None)


def default_device(value: str) -> None:
    """Sets ``TPU_PLUGIN_DEVICE`` to ``value`` unless the user set it (tools that run the
    plugin in-process, e.g. the TPU planner on its host's CPU backend)."""
    if value not in DEVICES:
        raise ValueError(f"unknown device {value!r}; choose one of: {', '.join(DEVICES)}")
    os.environ.setdefault("TPU_PLUGIN_DEVICE", value)


def share_libtpu() -> None:
    """Sets libtpu's ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` unless the user set it.

    libtpu takes ``/tmp/libtpu_lockfile`` when it loads, guarding the chips; compiling for
    abstract TPU devices (``tools/tpu_aot.py``) opens no chip, yet a second process doing so
    at the same time (another planner, the TPU compile tests) would fail with "Internal error
    when accessing libtpu multi-process lockfile". Called only by the ahead-of-time tools.
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def active_device() -> str:
    """The backend of an active plugin: ``TPU_PLUGIN_DEVICE``, else ``tpu``.

    Detection exports ``TPU_PLUGIN_DEVICE`` whenever it activates (``--device``, the variable,
    or a TPU host), so the fallback only matters for code imported outside vLLM.
    """
    return device() or "tpu"


def model_impl() -> str:
    """``TPU_PLUGIN_MODEL_IMPL``: auto|jax|torchax; ``auto`` picks the JAX port if one exists.

    ``torchax`` runs vLLM's own PyTorch model class through torchax (``models/torchax``), the
    path ``auto`` takes for architectures without a JAX port; ``jax`` refuses those.
    """
    return _choice("TPU_PLUGIN_MODEL_IMPL", MODEL_IMPLS, "auto") or "auto"


def attention_impl() -> str:
    """``TPU_PLUGIN_ATTENTION``: auto|xla|reference|pallas|pallas-interpret.

    ``auto`` is ``pallas`` on TPU and GPU and ``xla`` on CPU (pure jnp whose work follows the
    real KV lengths, so the page table needs no width buckets); ``reference`` is the spec
    (work follows the page table's width, bucketed by the runner); ``pallas`` is the
    Mosaic TPU kernel, or on a GPU backend the Pallas GPU (Triton) kernel (the reference where
    its tiles do not fit the shapes); ``pallas-interpret`` runs the TPU kernel in
    interpret mode on CPU (debugging, tests).
    """
    return _choice("TPU_PLUGIN_ATTENTION", ATTENTION_IMPLS, "auto") or "auto"


def moe_impl() -> str:
    """``TPU_PLUGIN_MOE``: auto|xla|reference|pallas|pallas-interpret; the fused-MoE kernel.

    ``auto`` is ``pallas`` (Mosaic) on TPU and ``xla`` (expert-sorted row tiles) on CPU and
    GPU; ``reference`` is the dense pure-jnp spec; ``pallas-interpret`` runs the TPU kernel
    in interpret mode on CPU (debugging, tests).
    """
    return _choice("TPU_PLUGIN_MOE", MOE_IMPLS, "auto") or "auto"


def quantized_matmul_impl() -> str:
    """``TPU_PLUGIN_QUANTIZED_MATMUL``: auto|reference|pallas|pallas-interpret.

    ``auto`` is the Pallas kernel on TPU (Mosaic) and GPU (Triton, for the shapes it tiles) and
    the jnp reference on CPU; ``pallas-interpret`` runs the TPU kernel in interpret mode.
    """
    return _choice("TPU_PLUGIN_QUANTIZED_MATMUL", QUANTIZED_MATMUL_IMPLS, "auto") or "auto"


MOE_OFFLOAD_POLICIES = ("off", "predict", "lru")
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10,
               "mib": 2**20, "gib": 2**30}  # fmt: skip


def moe_offload(raw: str | None = None) -> str:
    """``TPU_PLUGIN_MOE_OFFLOAD``: off (default) | predict | lru.

    ``predict`` and ``lru`` keep the routed experts of every MoE layer in host memory with a
    device expert cache (``tpu_plugin.layers.moe_offload``): ``predict`` orders eviction and
    prefetches by a per-request expert-activation history, ``lru`` is the plain
    least-recently-used baseline. ``raw``: a value given another way (vLLM's
    ``--additional-config``, ``runner/expert_cache.py``) instead of the environment's.
    """
    if raw is None:
        return _choice("TPU_PLUGIN_MOE_OFFLOAD", MOE_OFFLOAD_POLICIES, "off") or "off"
    value = str(raw).strip().lower() or "off"
    if value not in MOE_OFFLOAD_POLICIES:
        raise ValueError(
            f"moe_offload={raw!r} is not valid; choose one of: {', '.join(MOE_OFFLOAD_POLICIES)}"
        )
    return value


def moe_offload_cache(raw: str | None = None) -> tuple[str, float]:
    """``TPU_PLUGIN_MOE_OFFLOAD_CACHE``: the device expert cache's size (default ``0.25``).

    ``32``: experts per MoE layer (slots are shared by all layers: ``32 x layers`` in all);
    ``0.25``: that fraction of all routed experts; ``12GiB`` / ``500MB``: bytes. Returns
    ``("experts" | "fraction" | "bytes", value)``. ``raw``: as in :func:`moe_offload`.
    """
    if raw is None:
        raw = os.environ.get("TPU_PLUGIN_MOE_OFFLOAD_CACHE", "")
    raw = str(raw).strip().lower() or "0.25"
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit in _BYTE_UNITS and unit and value > 0:
        return "bytes", value * _BYTE_UNITS[unit]
    if not unit and value.is_integer() and value >= 1 and "." not in number:
        return "experts", value
    if not unit and 0 < value <= 1:
        return "fraction", value
    raise ValueError(
        f"TPU_PLUGIN_MOE_OFFLOAD_CACHE={raw!r} is not valid; give experts per MoE layer "
        "(32), a fraction of all experts (0.25) or bytes (12GiB, 500MB)"
    )


def moe_offload_prefetch(raw: str | int | None = None) -> int:
    """``TPU_PLUGIN_MOE_OFFLOAD_PREFETCH``: prefetch copies per step for ``predict`` (default
    4, 0 turns prefetch off); each is one expert, spread over groups of layers. ``raw``: as
    in :func:`moe_offload`."""
    return _count("TPU_PLUGIN_MOE_OFFLOAD_PREFETCH", raw, "4", minimum=0)


def moe_offload_copy_chunk(raw: str | int | None = None) -> int:
    """``TPU_PLUGIN_MOE_OFFLOAD_COPY_CHUNK``: demand copies issued together per MoE layer
    (default 1). A layer's misses are copied by a loop whose trip count depends on the
    routing; XLA GPU reads such a loop's condition on the host every iteration, so each copy
    costs a device-to-host sync. ``C`` copies an iteration cut the syncs ``C``-fold, paying up
    to ``C - 1`` copies more a layer (written to the trash slot). Not yet measured on a GPU."""
    return _count("TPU_PLUGIN_MOE_OFFLOAD_COPY_CHUNK", raw, "1", minimum=1)


def _count(name: str, raw: str | int | None, default: str, *, minimum: int) -> int:
    """Variable ``name`` (or ``raw``) as a whole number of at least ``minimum``."""
    if raw is None:
        raw = os.environ.get(name, default)
    text = str(raw).strip()
    if not text.isdigit() or int(text) < minimum:
        raise ValueError(f"{name}={raw!r} is not valid; give a count ({minimum} or more)")
    return int(text)


def plugin_home() -> str:
    """``TPU_PLUGIN_HOME``: cache root for built models and compiled programs."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "tpu-plugin")
    return os.environ.get("TPU_PLUGIN_HOME", default)


def compile_cache_dir() -> str | None:
    """``TPU_PLUGIN_COMPILE_CACHE``: JAX persistent compilation cache dir ("off" disables)."""
    value = os.environ.get("TPU_PLUGIN_COMPILE_CACHE", "")
    if value.lower() == "off":
        return None
    return value or os.path.join(plugin_home(), "jax-compile-cache")


def precompile() -> bool:
    """``TPU_PLUGIN_PRECOMPILE``: 1 (default) compiles every bucket at start-up; 0 skips it.

    With it off, each bucket compiles on first use (start-up is faster, serving is not).
    """
    value = os.environ.get("TPU_PLUGIN_PRECOMPILE", "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"TPU_PLUGIN_PRECOMPILE={value!r} is not valid; choose one of: 1, 0")


# The platform the programs being built are for, while the TPU planner compiles for a TPU
# from a CPU host (compile_for); None: this process's own JAX backend.
_TARGET: str | None = None


def compile_target() -> str | None:
    """The platform :func:`compile_for` set, or None (no JAX call: safe before JAX starts)."""
    return _TARGET


def target_platform() -> str:
    """The platform whose choices (``auto`` kernels, static or run-time sampler flags) the
    programs built now follow: :func:`compile_for`'s, else this process's JAX backend."""
    if _TARGET is not None:
        return _TARGET
    import jax

    return jax.default_backend()


@contextlib.contextmanager
def compile_for(platform: str) -> Iterator[None]:
    """Builds the enclosed block's programs for ``platform`` (the TPU planner on a CPU host:
    ``tpu_plugin.tools.tpu_aot.tpu_kernels``): every ``auto`` choice follows the target, not
    the host, then the host's choices come back."""
    global _TARGET
    saved, _TARGET = _TARGET, platform
    try:
        yield
    finally:
        _TARGET = saved


@contextlib.contextmanager
def kernel_override(*, attention: str, moe: str, quantized_matmul: str = "auto") -> Iterator[None]:
    """Sets ``TPU_PLUGIN_ATTENTION``, ``TPU_PLUGIN_MOE`` and ``TPU_PLUGIN_QUANTIZED_MATMUL`` for
    the enclosed block, then restores them: the TPU planner compiles the kernels a TPU host
    would pick from a process whose own JAX backend is a CPU
    (``tpu_plugin.tools.tpu_aot.tpu_kernels``)."""
    if (
        attention not in ATTENTION_IMPLS
        or moe not in MOE_IMPLS
        or quantized_matmul not in QUANTIZED_MATMUL_IMPLS
    ):
        raise ValueError(
            f"unknown kernel choice: attention={attention!r}, moe={moe!r}, "
            f"quantized_matmul={quantized_matmul!r}"
        )
    names = {
        "TPU_PLUGIN_ATTENTION": attention,
        "TPU_PLUGIN_MOE": moe,
        "TPU_PLUGIN_QUANTIZED_MATMUL": quantized_matmul,
    }
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
