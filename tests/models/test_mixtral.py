"""Mixtral against Hugging Face transformers (PyTorch, fp32).

Small random-weight checkpoints of the real architecture: Mixtral 8x7B's routing (8 experts,
top-2, weights renormalised) without a sliding window (``null``, as in 8x7B v0.1 and 8x22B), and
with an 8-token window on every layer (five of the eight prompts are longer). The prompt lengths
and MoE shapes equal the Qwen3-MoE tests', so the jitted MoE programs compile once per run.
transformers 5 saves the experts with Mixtral's Hub names
(``block_sparse_moe.experts.N.w1/w3/w2.weight``), which the loader stacks; a checkpoint in
transformers 5's in-memory layout (``mlp.gate``, fused ``mlp.experts``) must load to the same
logits.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers import MixtralConfig

from tests.conftest import (
    PROMPT_LENGTHS,
    SMALL,
    assert_greedy_matches_hf,
    assert_logits_match_hf,
    jax_last_logits,
    make_random_checkpoint,
    random_prompts,
)

MOE = dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(**(SMALL | MOE), sliding_window=None),
    "mixtral-window": lambda: MixtralConfig(**(SMALL | MOE), sliding_window=8),
}


def prompts_for(name: str) -> list[list[int]]:
    return random_prompts(SMALL["vocab_size"], PROMPT_LENGTHS)


def checkpoint(tmp_path, name: str):
    return make_random_checkpoint(tmp_path / name, CONFIGS[name](), norm_noise=0.2)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(tmp_path, name):
    assert_logits_match_hf(checkpoint(tmp_path, name), prompts_for(name), name)


def test_transformers_fused_layout_loads_the_same(tmp_path):
    """``mlp.gate`` and fused ``mlp.experts`` load like the Hub's per-expert w1/w3/w2."""
    name = "mixtral"
    model_dir = checkpoint(tmp_path, name)
    cfg = CONFIGS[name]()
    tensors = load_file(model_dir / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".block_sparse_moe." not in k}
    for layer in range(cfg.num_hidden_layers):
        old, new = f"model.layers.{layer}.block_sparse_moe", f"model.layers.{layer}.mlp"
        experts = range(cfg.num_local_experts)
        fused[f"{new}.gate.weight"] = tensors[f"{old}.gate.weight"]
        fused[f"{new}.experts.gate_up_proj"] = np.stack(
            [
                np.concatenate(
                    [
                        tensors[f"{old}.experts.{e}.w1.weight"],
                        tensors[f"{old}.experts.{e}.w3.weight"],
                    ]
                )
                for e in experts
            ]
        )
        fused[f"{new}.experts.down_proj"] = np.stack(
            [tensors[f"{old}.experts.{e}.w2.weight"] for e in experts]
        )
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    (fused_dir / "config.json").write_text((model_dir / "config.json").read_text())
    save_file(fused, fused_dir / "model.safetensors", metadata={"format": "pt"})
    prompts = random_prompts(SMALL["vocab_size"], PROMPT_LENGTHS[:3])
    np.testing.assert_array_equal(
        jax_last_logits(fused_dir, prompts), jax_last_logits(model_dir, prompts)
    )


def test_greedy_ragged_batch_matches_hf(tmp_path, make_llm):
    name = "mixtral-window"
    assert_greedy_matches_hf(make_llm, checkpoint(tmp_path, name), prompts_for(name))
