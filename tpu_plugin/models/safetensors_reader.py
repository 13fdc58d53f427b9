"""Reading safetensors tensors where safetensors' own readers cannot: into host memory as
NumPy (bfloat16 included, for MoE offload's host experts) and FP8 tensors (the flax reader has
no 8-bit float types). Kept apart from ``loader.py``, which decides what goes where."""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """The checkpoint does not match the architecture; the message names the tensor."""


# safetensors dtype names -> NumPy dtypes (ml_dtypes, JAX's own, for the ones NumPy lacks).
_HOST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


class HostReader:
    """A safetensors file's tensors as NumPy arrays in host memory, for ``load_model``'s
    ``host`` parameters and the FP8 tensors safetensors' flax reader cannot represent.
    safetensors' own NumPy reader cannot return bfloat16 (NumPy has no such type), the dtype
    of nearly every MoE checkpoint; this one maps the file and views the bytes with
    ml_dtypes' types, so nothing passes through the device."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.header = header
        self.data = np.memmap(path, np.uint8, mode="r", offset=8 + size)

    def get_tensor(self, name: str) -> np.ndarray:
        entry = self.header[name]
        if entry["dtype"] not in _HOST_DTYPES:
            raise CheckpointError(
                f"{name} is {entry['dtype']}, which tpu-plugin cannot read into host memory"
            )
        begin, end = entry["data_offsets"]
        raw = self.data[begin:end].view(_HOST_DTYPES[entry["dtype"]])
        return raw.reshape(entry["shape"])  # a view of the map: load_model's astype copies


def read_on_device(reader: Any, host_reader: HostReader, name: str) -> jax.Array:
    """Tensor ``name`` on the device; e4m3 / e5m2 tensors (FP8 checkpoints) through the file's
    bytes, since safetensors' flax reader cannot represent them."""
    try:
        return reader.get_tensor(name)
    except (AttributeError, TypeError, ValueError):
        return jnp.asarray(host_reader.get_tensor(name))
