"""Builds a native model and fills it from a Hugging Face safetensors checkpoint.

The model is first built abstractly (``nnx.eval_shape``: shapes only, no memory), then every
parameter is read by its Hugging Face name, checked for shape and cast to the serving dtype.
A missing or misshaped tensor stops start-up with its name; nothing is left random.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open
from vllm.logger import init_logger

from tpu_plugin.models.registry import resolve_model_class

logger = init_logger(__name__)

# Tensors some checkpoints carry that no port needs (buffers, not weights).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """The checkpoint does not match the architecture; the message names the tensor."""


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


def load_model(model_dir: str, hf_config: Any, dtype: jnp.dtype) -> nnx.Module:
    """The architecture's flax model with the checkpoint's weights, in ``dtype``."""
    model_class = resolve_model_class(list(hf_config.architectures or []))
    abstract = nnx.eval_shape(lambda: model_class(hf_config, dtype))
    graphdef, state = nnx.split(abstract)
    wanted = {_param_name(path): leaf for path, leaf in nnx.to_flat_state(state)}

    loaded: dict[str, jax.Array] = {}
    unexpected: list[str] = []
    for file in checkpoint_files(model_dir):
        with safe_open(file, framework="flax") as reader:
            for name in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name not in wanted:
                    if not name.endswith(_IGNORED_SUFFIXES):
                        unexpected.append(name)
                    continue
                tensor = reader.get_tensor(name)
                expected = wanted[name].get_value().shape
                if tuple(tensor.shape) != tuple(expected):
                    raise CheckpointError(
                        f"{name} has shape {tuple(tensor.shape)} in the checkpoint, but "
                        f"{model_class.__name__} expects {tuple(expected)}"
                    )
                loaded[name] = tensor.astype(dtype)

    missing = sorted(set(wanted) - set(loaded))
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {model_dir} lacks {len(missing)} tensors: {shown}")
    # Tied embeddings: checkpoints often still carry lm_head.weight; it is the embedding.
    unexpected = [n for n in unexpected if n != "lm_head.weight"]
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
