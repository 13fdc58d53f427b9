"""Phi-3 against Hugging Face transformers (PyTorch, fp32).

Phi-3 checkpoints fuse q/k/v (``qkv_proj``) and gate/up (``gate_up_proj``); the loader cuts
them into the shared modules. Configs: Phi-3-mini's shape (full rotary, untied, a sliding
window on every layer, here 16 tokens with longer prompts) and Phi-4-mini's partial rotary
(0.75) with tied embeddings (real Phi-4-mini also uses ``longrope``, which is not supported).
A checkpoint re-saved with split tensors must load to the same logits.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers import Phi3Config

from tests.conftest import LONG_PROMPT_LENGTHS, PROMPT_LENGTHS, SMALL, jax_last_logits
from tests.models.helpers import (
    check_greedy_matches_hf,
    check_logits_match_hf,
    checkpoint,
    prompts,
)

# Phi-3's special token ids (32000…) lie outside the small vocabulary.
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "phi3-mini-window": lambda: Phi3Config(
        **SMALL, **TOKENS, sliding_window=16, tie_word_embeddings=False
    ),
    "phi3-partial-rotary-tied": lambda: Phi3Config(
        **SMALL, **TOKENS, partial_rotary_factor=0.75, tie_word_embeddings=True
    ),
}


def lengths_for(name: str) -> tuple[int, ...]:
    return LONG_PROMPT_LENGTHS if "window" in name else PROMPT_LENGTHS


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(tmp_path, name):
    check_logits_match_hf(tmp_path, CONFIGS, name, lengths_for(name))


def test_split_checkpoint_layout_loads_the_same(tmp_path):
    """The fused checkpoint and one with q/k/v and gate/up stored apart give equal logits."""
    name = "phi3-partial-rotary-tied"
    model_dir = checkpoint(tmp_path, CONFIGS, name)
    cfg = CONFIGS[name]()
    q_rows = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    kv_rows = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    split = {}
    for key, tensor in load_file(model_dir / "model.safetensors").items():
        if key.endswith("qkv_proj.weight"):
            base = key.removesuffix("qkv_proj.weight")
            q, k, v = np.split(tensor, [q_rows, q_rows + kv_rows])
            split |= {
                f"{base}q_proj.weight": q,
                f"{base}k_proj.weight": k,
                f"{base}v_proj.weight": v,
            }
        elif key.endswith("gate_up_proj.weight"):
            base = key.removesuffix("gate_up_proj.weight")
            gate, up = np.split(tensor, 2)
            split |= {f"{base}gate_proj.weight": gate, f"{base}up_proj.weight": up}
        else:
            split[key] = tensor
    save_file(split, model_dir / "model.safetensors", metadata={"format": "pt"})
    sample = prompts(lengths_for(name))
    fused_dir = checkpoint(tmp_path / "fused", CONFIGS, name)
    np.testing.assert_array_equal(
        jax_last_logits(model_dir, sample), jax_last_logits(fused_dir, sample)
    )


def test_greedy_ragged_batch_matches_hf(tmp_path, make_llm):
    name = "phi3-mini-window"
    check_greedy_matches_hf(tmp_path, make_llm, CONFIGS, name, lengths_for(name))
