"""Steps shared by the model tests, so each family's test states only what is its own.

Every family is tested the same way: a small random-weight checkpoint per named config (noisy
norm weights), last-position logits and greedy tokens against HF. The MoE families (Qwen3-MoE,
Mixtral) also re-save a checkpoint in transformers 5's in-memory layout (experts fused into
``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``) that must load to exactly the
per-expert checkpoint's logits; only the tensor names differ per family, so the tests pass those
in. The generic checks take the prompt lengths: sliding-window configs need prompts longer than
the window (``LONG_PROMPT_LENGTHS``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from tests.conftest import (
    PROMPT_LENGTHS,
    SMALL,
    assert_greedy_matches_hf,
    assert_logits_match_hf,
    jax_last_logits,
    make_random_checkpoint,
    random_prompts,
)

Configs = dict[str, Callable[[], object]]


def checkpoint(tmp_path: Path, configs: Configs, name: str) -> Path:
    """The random-weight checkpoint of ``configs[name]`` (noisy norms, as every model test)."""
    return make_random_checkpoint(tmp_path / name, configs[name](), norm_noise=0.2)


def prompts(lengths: tuple[int, ...] = PROMPT_LENGTHS) -> list[list[int]]:
    return random_prompts(SMALL["vocab_size"], lengths)


def check_logits_match_hf(
    tmp_path: Path, configs: Configs, name: str, lengths: tuple[int, ...] = PROMPT_LENGTHS
) -> None:
    """``configs[name]``'s last-position logits against HF fp32 (labelled ``name``)."""
    assert_logits_match_hf(checkpoint(tmp_path, configs, name), prompts(lengths), name)


def check_greedy_matches_hf(
    tmp_path: Path,
    make_llm,
    configs: Configs,
    name: str,
    lengths: tuple[int, ...] = PROMPT_LENGTHS,
) -> None:
    """``configs[name]``'s greedy tokens through ``vllm.LLM`` (one ragged batch) against HF."""
    model_dir = checkpoint(tmp_path, configs, name)
    assert_greedy_matches_hf(make_llm, model_dir, prompts(lengths))


def stack_experts(
    tensors: dict[str, np.ndarray], prefix: str, num_experts: int, names: tuple[str, str, str]
) -> dict[str, np.ndarray]:
    """One layer's per-expert ``{prefix}.{e}.{name}.weight`` tensors in the fused layout.

    ``names`` are the (gate, up, down) projections' names, e.g. ``("w1", "w3", "w2")``.
    Returns ``{"gate_up_proj": [E, 2I, H], "down_proj": [E, H, I]}``.
    """
    gate, up, down = (
        [tensors[f"{prefix}.{e}.{name}.weight"] for e in range(num_experts)] for name in names
    )
    return {
        "gate_up_proj": np.stack([np.concatenate(pair) for pair in zip(gate, up, strict=True)]),
        "down_proj": np.stack(down),
    }


def assert_fused_layout_loads_the_same(
    tmp_path: Path,
    model_dir: Path,
    num_layers: int,
    keep: Callable[[str], bool],
    fused_layer: Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]],
) -> None:
    """Re-saves ``model_dir`` with the tensors ``keep`` accepts plus ``fused_layer(tensors,
    layer)`` for each of its ``num_layers`` layers, and checks that the copy gives bit-identical
    last-position logits (the loader must stack per-expert tensors to the fused arrays)."""
    tensors = load_file(model_dir / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if keep(k)}
    for layer in range(num_layers):
        fused |= fused_layer(tensors, layer)
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    (fused_dir / "config.json").write_text((model_dir / "config.json").read_text())
    save_file(fused, fused_dir / "model.safetensors", metadata={"format": "pt"})
    sample = prompts(PROMPT_LENGTHS[:3])
    np.testing.assert_array_equal(
        jax_last_logits(fused_dir, sample), jax_last_logits(model_dir, sample)
    )
