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

import pytest
from transformers import MixtralConfig

from tests.conftest import SMALL
from tests.models.helpers import (
    assert_fused_layout_loads_the_same,
    check_greedy_matches_hf,
    check_logits_match_hf,
    checkpoint,
    stack_experts,
)

MOE = dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(**(SMALL | MOE), sliding_window=None),
    "mixtral-window": lambda: MixtralConfig(**(SMALL | MOE), sliding_window=8),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(tmp_path, name):
    check_logits_match_hf(tmp_path, CONFIGS, name)


def test_transformers_fused_layout_loads_the_same(tmp_path):
    """``mlp.gate`` and fused ``mlp.experts`` load like the Hub's per-expert w1/w3/w2."""
    cfg = CONFIGS["mixtral"]()

    def fused_layer(tensors, layer):
        old, new = f"model.layers.{layer}.block_sparse_moe", f"model.layers.{layer}.mlp"
        stacked = stack_experts(
            tensors, f"{old}.experts", cfg.num_local_experts, ("w1", "w3", "w2")
        )
        return {f"{new}.gate.weight": tensors[f"{old}.gate.weight"]} | {
            f"{new}.experts.{name}": value for name, value in stacked.items()
        }

    assert_fused_layout_loads_the_same(
        tmp_path,
        checkpoint(tmp_path, CONFIGS, "mixtral"),
        cfg.num_hidden_layers,
        keep=lambda key: ".block_sparse_moe." not in key,
        fused_layer=fused_layer,
    )


# slow: 30 s; Mixtral's logits tests and Qwen3-MoE's greedy test cover MoE by default
@pytest.mark.slow
def test_greedy_ragged_batch_matches_hf(tmp_path, make_llm):
    check_greedy_matches_hf(tmp_path, make_llm, CONFIGS, "mixtral-window")
