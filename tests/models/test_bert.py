"""The BERT-family encoder port (BERT, RoBERTa, XLM-RoBERTa) against Hugging Face, directly.

Random-weight checkpoints (noisy LayerNorm weights and biases); several inputs of different
lengths in one ragged step, so the bidirectional attention must see each whole input and
nothing of its neighbours. Every token's final hidden state is compared with HF's
``last_hidden_state`` (fp32, rel. error <= 1e-4).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, BertConfig, XLMRobertaConfig

from tests.conftest import max_rel_error, random_prompts
from tpu_plugin.models.loader import load_model
from tpu_plugin.tools.direct_steps import empty_kv_caches, ragged_step

ENCODER = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    pad_token_id=1,
)
CONFIGS = {
    "bert": lambda: BertConfig(**ENCODER, type_vocab_size=2),
    "xlm_roberta": lambda: XLMRobertaConfig(**ENCODER, type_vocab_size=1),
}
LENGTHS = (7, 30, 1, 17, 64)


def random_encoder(out_dir, config) -> None:
    torch.manual_seed(0)
    config.initializer_range = 0.5
    model = AutoModel.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(out_dir, safe_serialization=True)


def port_hidden_states(model_dir, prompts: list[list[int]]) -> list[np.ndarray]:
    """The port's final hidden states, all prompts in one ragged step."""
    cfg = AutoConfig.from_pretrained(model_dir)
    model = load_model(str(model_dir), cfg, jnp.float32)
    pages_per_seq = 8
    num_pages = pages_per_seq * len(prompts)
    step = ragged_step(prompts, [0] * len(prompts), pages_per_seq, num_pages)
    heads, dim, _ = model.kv_cache_layout(cfg)
    caches = empty_kv_caches((cfg.num_hidden_layers, heads, dim), num_pages)
    _, hidden = model(caches, step.input_ids, step.positions, step.attention)
    hidden = np.asarray(hidden)
    bounds = np.cumsum([0, *map(len, prompts)])
    return [hidden[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hidden_states_match_hf(tmp_path, name):
    random_encoder(tmp_path, CONFIGS[name]())
    prompts = random_prompts(ENCODER["vocab_size"], LENGTHS)
    prompts = [[t if t != ENCODER["pad_token_id"] else 5 for t in p] for p in prompts]
    hf = AutoModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = port_hidden_states(tmp_path, prompts)
    errors = []
    with torch.no_grad():
        for prompt, got in zip(prompts, ours, strict=True):
            want = hf(input_ids=torch.tensor([prompt])).last_hidden_state[0].numpy()
            errors.append(max_rel_error(got, want))
    print(f"{name}: hidden states rel. error max {max(errors):.2e}")
    assert max(errors) <= 1e-4


def test_position_table_bounds_the_input(tmp_path):
    """XLM-RoBERTa positions start at pad + 1, so 128 positions hold 126-token inputs."""
    from tpu_plugin.models.bert import BertModel, RobertaModel

    assert BertModel.max_input_len(CONFIGS["bert"]()) == 128
    assert RobertaModel.max_input_len(CONFIGS["xlm_roberta"]()) == 126
