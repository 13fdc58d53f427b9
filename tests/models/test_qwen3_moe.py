"""Qwen3-MoE against Hugging Face transformers (PyTorch, fp32), and the MoE layer's kernel.

Small random-weight checkpoints of the real architecture (Qwen3-30B-A3B's shape shrunk: explicit
``head_dim``, untied, ``norm_topk_prob``, every layer sparse) and a mixed one where
``decoder_sparse_step=2`` and ``mlp_only_layers`` leave one sparse layer among three dense ones,
tied, without ``norm_topk_prob``. transformers 5 saves the experts apart
(``mlp.experts.N.gate_proj.weight``, as on the Hub), so the parity tests also cover the loader's
stacking; a checkpoint with the fused ``experts.gate_up_proj`` must load to the same logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, Qwen3MoeConfig

from tests.conftest import SMALL, max_rel_error
from tests.models import helpers
from tests.models.helpers import (
    assert_fused_layout_loads_the_same,
    check_greedy_matches_hf,
    check_logits_match_hf,
    stack_experts,
)

MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=32)
CONFIGS = {
    "qwen3-moe": lambda: Qwen3MoeConfig(
        **SMALL, **MOE, norm_topk_prob=True, tie_word_embeddings=False
    ),
    "qwen3-moe-mixed": lambda: Qwen3MoeConfig(
        **(SMALL | dict(num_hidden_layers=4)),
        **MOE,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        norm_topk_prob=False,
        tie_word_embeddings=True,
    ),
}


def checkpoint(tmp_path, name: str):
    return helpers.checkpoint(tmp_path, CONFIGS, name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(tmp_path, name):
    check_logits_match_hf(tmp_path, CONFIGS, name)


def test_mixed_layers_are_dense_and_sparse(tmp_path):
    """Layers 0, 2 (step 2) and 3 (``mlp_only_layers``) are dense; layer 1 is sparse."""
    from tpu_plugin.layers.moe import SparseMoeBlock
    from tpu_plugin.models.loader import load_model

    model_dir = checkpoint(tmp_path, "qwen3-moe-mixed")
    model = load_model(str(model_dir), AutoConfig.from_pretrained(model_dir), jnp.float32)
    kinds = [isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers]
    assert kinds == [False, True, False, False]


def test_moe_layer_uses_xla_path_and_matches_reference(tmp_path):
    """On CPU the block runs ``xla.fused_moe`` (rows grouped by expert), equal to the dense
    reference on the model's own weights and routing; the weights carry the ``expert`` axis."""
    from tpu_kernels.fused_moe import reference, xla
    from tpu_plugin.layers.moe import EXPERT_AXIS, moe_kernel
    from tpu_plugin.models.loader import load_model

    assert moe_kernel() is xla.fused_moe
    model_dir = checkpoint(tmp_path, "qwen3-moe")
    model = load_model(str(model_dir), AutoConfig.from_pretrained(model_dir), jnp.float32)
    block = model.model.layers[0].mlp
    x = jax.random.normal(jax.random.key(0), (37, SMALL["hidden_size"]), jnp.float32)
    weights, ids = block.route(x)
    assert set(np.unique(ids)) == set(range(MOE["num_experts"])), "every expert must be hit"
    expected = reference.fused_moe(
        x, weights, ids, block.experts.gate_up_proj[...], block.experts.down_proj[...]
    )
    rel = max_rel_error(np.asarray(block(x)), np.asarray(expected))
    print(f"qwen3-moe layer 0: xla vs reference rel. error {rel:.2e}")
    assert rel <= 1e-5
    # The expert weights carry the expert-parallel annotation for a later mesh.
    spec = nnx_partition_spec(block.experts)
    assert spec == {
        "gate_up_proj": (EXPERT_AXIS, None, None),
        "down_proj": (EXPERT_AXIS, None, None),
    }


def nnx_partition_spec(module) -> dict[str, tuple]:
    from flax import nnx

    specs = nnx.get_partition_spec(nnx.state(module))
    return {str(path[-1]): tuple(leaf.get_value()) for path, leaf in nnx.to_flat_state(specs)}


def test_fused_checkpoint_layout_loads_the_same(tmp_path):
    """Experts saved fused (transformers 5's in-memory layout) give the per-expert logits."""
    cfg = CONFIGS["qwen3-moe"]()

    def fused_layer(tensors, layer):
        base = f"model.layers.{layer}.mlp.experts"
        stacked = stack_experts(
            tensors, base, cfg.num_experts, ("gate_proj", "up_proj", "down_proj")
        )
        return {f"{base}.{name}": value for name, value in stacked.items()}

    assert_fused_layout_loads_the_same(
        tmp_path,
        checkpoint(tmp_path, "qwen3-moe"),
        cfg.num_hidden_layers,
        keep=lambda key: ".experts." not in key,
        fused_layer=fused_layer,
    )


def test_missing_expert_names_the_tensor(tmp_path):
    from tpu_plugin.models.loader import CheckpointError, load_model

    model_dir = checkpoint(tmp_path, "qwen3-moe")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks model\.layers\.1\.mlp\.experts\.5\.up_proj"):
        load_model(str(model_dir), AutoConfig.from_pretrained(model_dir), jnp.float32)


def test_greedy_ragged_batch_matches_hf(tmp_path, make_llm):
    check_greedy_matches_hf(tmp_path, make_llm, CONFIGS, "qwen3-moe-mixed")
