"""The checkpoint loader: dtypes, fused/split layouts, and the errors it stops start-up with.

Model numerics live in the per-family tests; here the checkpoint side: a bf16 checkpoint must
serve in fp32 exactly as HF upcasts it, and in bf16 within bf16 rounding; fused tensors are cut
by name; bad layouts and unsupported configurations fail naming the problem.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from transformers import AutoConfig, Phi3Config, Qwen3Config

from tests.conftest import (
    SMALL,
    assert_logits_match_hf,
    make_random_checkpoint,
    random_prompts,
)
from tpu_plugin.models.loader import CheckpointError, load_model, split_targets
from tpu_plugin.models.registry import UnsupportedModelError, check_architecture


def qwen3_tied() -> Qwen3Config:
    return Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True)


def test_bf16_checkpoint_serves_in_fp32_and_bf16(tmp_path):
    model_dir = make_random_checkpoint(
        tmp_path / "bf16", qwen3_tied(), norm_noise=0.2, dtype="bfloat16"
    )
    prompts = random_prompts(SMALL["vocab_size"])
    # HF loads the bf16 weights upcast to fp32: the fp32 port must match it as tightly as ever.
    assert_logits_match_hf(model_dir, prompts, "bf16 checkpoint, fp32 serving")
    # bf16 activations: only bf16 rounding apart (8 mantissa bits, 2 layers).
    assert_logits_match_hf(
        model_dir, prompts, "bf16 checkpoint, bf16 serving", tol=3e-2, dtype=jnp.bfloat16
    )


def test_fp32_checkpoint_loads_in_bf16(tmp_path):
    model_dir = make_random_checkpoint(tmp_path / "fp32", qwen3_tied())
    model = load_model(str(model_dir), AutoConfig.from_pretrained(model_dir), jnp.bfloat16)
    assert model.model.layers[0].self_attn.q_norm.weight[...].dtype == jnp.bfloat16
    assert model.model.embed_tokens.weight[...].dtype == jnp.bfloat16


def test_split_targets_cuts_fused_names_and_keeps_others():
    fused = {"self_attn.qkv_proj": [("self_attn.q_proj", 8), ("self_attn.k_proj", 4)]}
    assert split_targets("model.layers.3.self_attn.qkv_proj.bias", fused) == [
        ("model.layers.3.self_attn.q_proj.bias", 8),
        ("model.layers.3.self_attn.k_proj.bias", 4),
    ]
    assert split_targets("model.layers.3.mlp.down_proj.weight", fused) == [
        ("model.layers.3.mlp.down_proj.weight", None)
    ]


def test_fused_tensor_of_the_wrong_size_names_it(tmp_path):
    model_dir = make_random_checkpoint(tmp_path / "phi3", Phi3Config(**SMALL, pad_token_id=0))
    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.num_key_value_heads = 1  # the checkpoint's qkv_proj was made for 2 KV heads
    with pytest.raises(CheckpointError, match=r"qkv_proj.weight has 128 rows .* need 96"):
        load_model(str(model_dir), cfg, jnp.float32)


def test_position_dependent_rope_fails_naming_the_supported_ones(tmp_path):
    rope = {
        "rope_type": "longrope",
        "short_factor": [1.0] * 8,
        "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 256,
    }
    cfg = Phi3Config(
        **SMALL, pad_token_id=0, rope_parameters=rope, architectures=["Phi3ForCausalLM"]
    )
    with pytest.raises(ValueError, match="'longrope' depends on the sequence length.*yarn"):
        load_model(str(tmp_path), cfg, jnp.float32)


def test_every_family_is_registered_and_others_fail_listing_them():
    families = [
        "Gemma3ForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Phi3ForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    ]
    for arch in families:
        assert check_architecture([arch]) == arch
    with pytest.raises(
        UnsupportedModelError, match="NoSuchForCausalLM has no JAX port.*" + ".*".join(families)
    ):
        check_architecture(["NoSuchForCausalLM"])
