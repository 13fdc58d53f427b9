"""Compiled programs kept on disk under a key of our own, so a warm start-up skips tracing.

JAX's persistent compilation cache is keyed on the lowered program: a warm start-up still
traces and lowers every bucket before it can look the program up, which for a 30-layer model
is most of the start-up (benchmarks/NOTES_startup.md). This cache stores each precompiled
program's serialized executable (``jax.experimental.serialize_executable``) under a key built
from everything that decides the program without tracing it:

* the plugin's own code (every ``.py`` file of ``tpu_plugin`` and ``tpu_kernels``), the
  jax/jaxlib/flax/vLLM versions, ``XLA_FLAGS``/``LIBTPU_INIT_ARGS``, the JAX flags that change
  numerics, and every ``TPU_PLUGIN_*`` variable (attention, MoE and model implementation);
* the backend platform, its version, the device kinds and count, the device ids programs
  run on (argument donation is written in the source, ``donate_argnums``, so hashed with it);
* the model's HF config, dtype and parallel sizes (:meth:`ExecutableCache.for_runner`);
* each program's name, static flags and every argument's shape, dtype, weak type, sharding
  (with device ids) and the tree structure (parameter names included).

A program whose key matches was built from the same code for the same shapes, so a stale
program cannot be loaded short of a code change outside those files (a patched jaxlib of the
same version, an edited vLLM model for torchax, which therefore does not use this cache).
Entries are written to a temporary file and renamed, so a reader sees a whole entry or none;
an entry that does not load is logged, removed and compiled again. A process killed while
writing (SIGKILL) leaves its temporary file behind: the next cache opened in that folder
removes temporary files of processes that no longer run. On SIGTERM, start-up lets a write
in progress finish and stores nothing more (:meth:`ExecutableCache.finish_writes`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pickle
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache as jax_cache
from vllm.logger import init_logger

from tpu_plugin import envs

logger = init_logger(f"vllm.{__name__}")

SUBDIR = "executables"
# Bumped when the entry layout below changes.
FORMAT = 1
# Variables that choose where files go or whether start-up compiles, not what is compiled.
_UNKEYED_VARS = ("TPU_PLUGIN_COMPILE_CACHE", "TPU_PLUGIN_HOME", "TPU_PLUGIN_PRECOMPILE")
# JAX flags that change the program a trace produces.
_JAX_FLAGS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_numpy_dtype_promotion",
    "jax_threefry_partitionable",
    "jax_default_prng_impl",
)


@functools.cache
def source_digest() -> str:
    """SHA-256 over the plugin's and its kernels' Python sources (paths and contents)."""
    digest = hashlib.sha256()
    for package in ("tpu_plugin", "tpu_kernels"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            digest.update(f"{package}: missing".encode())
            continue
        for root in spec.submodule_search_locations:
            for path in sorted(Path(root).rglob("*.py")):
                digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def environment() -> dict[str, Any]:
    """What every program of this process depends on besides its model and shapes."""
    backend = jax.devices()[0].client
    devices = jax.devices()
    return {
        "format": FORMAT,
        "source": source_digest(),
        "versions": {d: _version(d) for d in ("jax", "jaxlib", "flax", "vllm")},
        "platform": backend.platform,
        "platform_version": backend.platform_version,
        "device_kinds": sorted({d.device_kind for d in devices}),
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "env": {
            k: v
            for k, v in sorted(os.environ.items())
            if (k.startswith("TPU_PLUGIN_") and k not in _UNKEYED_VARS)
            or k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")
        },
        "jax_flags": {name: str(getattr(jax.config, name, None)) for name in _JAX_FLAGS},
    }


def _sharding(value: Any) -> str:
    sharding = getattr(value, "sharding", None)
    if sharding is None:  # a host array: placed by the program's own input sharding
        return "host"
    devices = getattr(sharding, "_device_assignment", None) or ()
    return f"{sharding!r}@{[d.id for d in devices]}"


def describe(tree: Any) -> str:
    """A tree's structure and every leaf's shape, dtype, weak type and sharding."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = [str(treedef)]
    for leaf in leaves:
        aval = jax.typeof(leaf)
        weak = getattr(aval, "weak_type", False)
        parts.append(f"{aval.dtype}{list(aval.shape)}w{int(weak)}:{_sharding(leaf)}")
    return "\n".join(parts)


@contextlib.contextmanager
def jax_cache_bypassed() -> Iterator[None]:
    """Compiles inside skip JAX's persistent cache (neither read nor written).

    An executable JAX loaded from its cache does not serialize back whole on the CPU backend
    (the copy fails at run time with "Function ... not found"), so every program this cache
    stores must come from a real compile. JAX's cache is a process-wide setting; start-up
    compiles nothing else meanwhile.
    """
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    jax_cache.reset_cache()  # JAX decides once per process whether its cache is in use
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        jax_cache.reset_cache()


_TMP_PREFIX = ".tmp-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphaned_temporaries(directory: Path) -> int:
    """Deletes temporary entry files whose writer (the pid in the name) no longer runs."""
    removed = 0
    for path in directory.glob(f"{_TMP_PREFIX}*"):
        pid = path.name[len(_TMP_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


class ExecutableCache:
    """Serialized executables in ``directory``, keyed on ``context`` plus each program."""

    def __init__(self, directory: str | os.PathLike, context: dict[str, Any]):
        self.directory = Path(directory)
        self.context = json.dumps(context | {"environment": environment()}, sort_keys=True)
        self.hits = 0
        self.misses = 0
        self.stored = 0
        # precompile() loads and stores from several threads; the counts stay exact.
        self._count_lock = threading.Lock()
        # Held while an entry is written; finish_writes() waits on it, then closes the cache.
        self._write_lock = threading.Lock()
        self._closed = False
        remove_orphaned_temporaries(self.directory)

    def _count(self, counter: str) -> None:
        with self._count_lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def contains(self, key: str) -> bool:
        """Whether an entry for ``key`` exists (it may still fail to load)."""
        return self._path(key).exists()

    @classmethod
    def for_runner(cls, runner: Any) -> ExecutableCache | None:
        """The cache of ``runner``'s model, or None where it is off or does not apply.

        Off with ``TPU_PLUGIN_COMPILE_CACHE=off`` and for the torchax path (its program is
        vLLM's PyTorch model, whose source this key does not cover).
        """
        root = envs.compile_cache_dir()
        if root is None:
            return None
        if runner.model_impl == "torchax":
            logger.info("executable cache: not used for torchax models (JAX's cache still is)")
            return None
        parallel = runner.vllm_config.parallel_config
        context = {
            "hf_config": runner.hf_config.to_json_string(use_diff=False),
            "dtype": str(runner.dtype),
            "quantization": repr(getattr(runner, "quant", None)),  # models/quantization.py
            "model_impl": runner.model_impl,
            "parallel": [
                parallel.tensor_parallel_size,
                parallel.data_parallel_size,
                parallel.pipeline_parallel_size,
                bool(getattr(parallel, "enable_expert_parallel", False)),
            ],
        }
        if getattr(runner, "pooling", None) is not None:  # its forward returns pooled rows
            context["pooling"] = runner.pooling.method
        return cls(os.path.join(root, SUBDIR), context)

    def key(self, name: str, *parts: str) -> str:
        """The key of program ``name`` given descriptions (:func:`describe`) of its inputs."""
        digest = hashlib.sha256(self.context.encode())
        for part in (name, *parts):
            digest.update(b"\0" + part.encode())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.jaxexe"

    def load(self, key: str, args: tuple) -> jax.stages.Compiled | None:
        """The program stored under ``key``, loaded for ``args``' tree, or None."""
        path = self._path(key)
        if not path.exists():
            self._count("misses")
            return None
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f)
            if entry["key"] != key:
                raise ValueError(f"entry holds key {entry['key'][:12]}")
            by_id = {d.id: d for d in jax.devices()}
            compiled = serialize_executable.deserialize_and_load(
                entry["executable"],
                jax.tree.structure((args, {})),
                entry["out_tree"],
                execution_devices=[by_id[i] for i in entry["device_ids"]],
            )
        except Exception as exc:  # any unreadable entry is recompiled
            logger.warning("executable cache: %s does not load (%s); recompiling", path, exc)
            path.unlink(missing_ok=True)
            self._count("misses")
            return None
        self._count("hits")
        return compiled

    def finish_writes(self, timeout: float = 10.0) -> None:
        """Waits for an entry being written (if any) and refuses every later store: what is
        on disk is then final, for a process about to exit."""
        acquired = self._write_lock.acquire(timeout=timeout)
        self._closed = True
        if acquired:
            self._write_lock.release()

    def store(self, key: str, compiled: jax.stages.Compiled) -> bool:
        """Writes ``compiled`` under ``key`` (whole or not at all); False if it cannot be."""
        try:
            executable, _, out_tree = serialize_executable.serialize(compiled)
            devices = compiled._executable._unloaded_executable.device_list
            entry = {
                "key": key,
                "executable": executable,
                "out_tree": out_tree,
                "device_ids": [d.id for d in devices],
            }
            payload = pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
            with self._write_lock:
                if self._closed:
                    return False
                self.directory.mkdir(parents=True, exist_ok=True)
                prefix = f"{_TMP_PREFIX}{os.getpid()}-"
                fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=prefix, suffix=".jaxexe")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(payload)
                    os.replace(tmp, self._path(key))
                except BaseException:
                    os.unlink(tmp)
                    raise
        except Exception as exc:  # the program still runs, uncached
            logger.warning("executable cache: cannot store a program (%s)", exc)
            return False
        self._count("stored")
        return True
