"""DeepSeek-V3 (MLA + DeepSeekMoE) against Hugging Face transformers (PyTorch, fp32).

Small random-weight checkpoints of the real architecture: a dense first layer then MoE layers
(8 routed experts, top-2, 2 groups with 1 kept, 1 shared expert, sigmoid routing with a random
non-zero ``e_score_correction_bias`` so the biased choice is exercised), MLA with the q LoRA
path and interleaved rope, and a variant with a plain ``q_proj``, rotate-half rope and YaRN
scaling whose ``mscale`` and ``mscale_all_dim`` differ (both the rope and softmax factors).
The paged MLA attention is also checked on its own against the naive attention oracle, with
the hostile padding of the kernel tests.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import DeepseekV3Config

from tests.conftest import (
    assert_greedy_matches_hf,
    hf_last_logits,
    make_random_checkpoint,
    max_rel_error,
    random_prompts,
)
from tests.kernels.rpa_inputs import MIXES, check_padding_rows_zero, make_batch, naive_attention
from tests.kernels.rpa_inputs import rel_err as kernel_rel_err

VOCAB = 512
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    first_k_dense_replace=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=32,
    max_position_embeddings=512,
)
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=128,
    mscale=0.9,
    mscale_all_dim=1.0,
    beta_fast=32,
    beta_slow=1,
)
CONFIGS = {
    "dsv3-qlora-interleave": lambda: DeepseekV3Config(**BASE),
    "dsv3-no-qlora-yarn": lambda: DeepseekV3Config(
        **{
            **BASE,
            "num_hidden_layers": 2,
            "q_lora_rank": None,
            "rope_interleave": False,
            "rope_parameters": YARN,
        }
    ),
}


def make_checkpoint(out_dir: Path, config: DeepseekV3Config) -> Path:
    """A random checkpoint whose router correction biases are random and non-zero (HF
    initialises them to zero, which would leave the biased expert choice untested)."""
    import torch
    from safetensors.torch import load_file, save_file

    make_random_checkpoint(out_dir, config, norm_noise=0.2)
    path = out_dir / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(7)
    biased = [name for name in tensors if name.endswith("e_score_correction_bias")]
    assert biased, "the checkpoint has no MoE layer"
    for name in biased:
        tensors[name] = torch.randn(tensors[name].shape, generator=gen) * 0.5
    save_file(tensors, path, metadata={"format": "pt"})
    return out_dir


def jax_ragged_last_logits(model_dir: Path, prompts: list[list[int]]) -> np.ndarray:
    """The port's last-position logits with all prompts packed in one ragged, jitted step.

    Each sequence gets its own pages, handed out in shuffled order, so the page table is
    really followed; the pages are MLA's single latent array per layer.
    """
    from flax import nnx
    from transformers import AutoConfig

    from tpu_plugin.layers.attention import AttentionMetadata
    from tpu_plugin.models.loader import load_model
    from tpu_plugin.runner.kv_cache import cache_layout

    cfg = AutoConfig.from_pretrained(model_dir)
    model = load_model(str(model_dir), cfg, jnp.float32)
    heads, width, latent = cache_layout(cfg)
    assert latent and heads == 1

    page_size = 16
    lens = [len(p) for p in prompts]
    pages_per_seq = max(-(-n // page_size) for n in lens)
    num_pages = len(prompts) * pages_per_seq
    order = np.random.default_rng(0).permutation(num_pages).reshape(len(prompts), pages_per_seq)
    starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    slots = np.concatenate(
        [
            order[s, np.arange(n) // page_size] * page_size + np.arange(n) % page_size
            for s, n in enumerate(lens)
        ]
    )
    md = AttentionMetadata(
        slot_mapping=jnp.asarray(slots, jnp.int32),
        kv_lens=jnp.asarray(lens, jnp.int32),
        page_indices=jnp.asarray(order, jnp.int32),
        query_start_loc=jnp.asarray(starts),
        num_seqs=jnp.array([len(prompts)], jnp.int32),
    )
    positions = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
    caches = [
        jnp.zeros((num_pages, page_size, heads, width), jnp.float32)
        for _ in range(cfg.num_hidden_layers)
    ]
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, caches, ids, positions, md):
        model = nnx.merge(graphdef, params)
        _, hidden = model(caches, ids, positions, md)
        return model.compute_logits(hidden[md.query_start_loc[1:] - 1])

    ids = jnp.asarray(np.concatenate(prompts), jnp.int32)
    return np.asarray(forward(params, caches, ids, jnp.asarray(positions), md), np.float32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(tmp_path, name):
    model_dir = make_checkpoint(tmp_path / name, CONFIGS[name]())
    prompts = random_prompts(VOCAB)
    rel = max_rel_error(
        jax_ragged_last_logits(model_dir, prompts), hf_last_logits(model_dir, prompts)
    )
    print(f"{name}: last-position logits rel. error {rel:.2e} (tolerance 1e-04)")
    assert rel <= 1e-4, f"{name}: logits rel. error {rel:.2e} > 1e-04"


def test_greedy_ragged_batch_matches_hf(tmp_path, make_llm):
    model_dir = make_checkpoint(tmp_path / "dsv3", CONFIGS["dsv3-qlora-interleave"]())
    assert_greedy_matches_hf(make_llm, model_dir, random_prompts(VOCAB))


@pytest.mark.parametrize("mix", ["mixed", "chunked_prefill"])
def test_mla_paged_attention_matches_oracle(mix):
    """Absorbed MLA is MQA whose value is the key's first ``kv_lora_rank`` features: check it
    against the naive oracle with V = K, on NaN-poisoned unused slots and garbage padding,
    with the pages' rows padded to 128 lanes of NaN (``page_row_width``: never read)."""
    from tpu_plugin.layers.mla import mla_paged_attention, page_row_width

    latent = 32
    batch = make_batch(11, MIXES[mix], num_q_heads=4, num_kv_heads=1, head_dim=latent + 16)
    batch.v_pages = batch.k_pages
    lanes = page_row_width(latent + 16) - (latent + 16)
    padded = np.pad(batch.k_pages, [(0, 0)] * 3 + [(0, lanes)], constant_values=np.nan)
    out = mla_paged_attention(
        jnp.asarray(batch.queries),
        jnp.asarray(padded),
        *batch.args()[3:],
        sm_scale=0.2,
        value_dim=latent,
        token_block=8,
    )
    want = naive_attention(batch, sm_scale=0.2)[..., :latent]
    assert kernel_rel_err(out, want, batch.num_real_tokens) < 1e-5
    check_padding_rows_zero(out, batch.num_real_tokens)


def test_cache_layout_and_vllm_spec():
    """The runner asks the model for MLA's compressed layout; other models keep K/V pairs."""
    import torch
    from transformers import LlamaConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    from tpu_plugin.runner import kv_cache

    cfg = CONFIGS["dsv3-qlora-interleave"]()
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    layout = kv_cache.cache_layout(cfg)
    # 32 + 16 values per token, stored in one 128-lane row (mla.page_row_width).
    assert tuple(layout) == (1, 128, True)
    specs = kv_cache.kv_cache_spec(3, *layout[:2], 16, torch.float32, latent=True)
    spec = specs[kv_cache.layer_name(0)]
    assert type(spec) is MLAAttentionSpec and spec.page_size_bytes == 16 * 128 * 4
    # The expanded layout would cache every head's key (nope + rope) and value.
    expanded = FullAttentionSpec(
        block_size=16, num_kv_heads=4, head_size=48, head_size_v=32, dtype=torch.float32
    )
    assert expanded.page_size_bytes == 16 * 4 * (48 + 32) * 4
    print(
        f"fp32 bytes per token and layer: MLA {spec.page_size_bytes // 16}, expanded K/V "
        f"{expanded.page_size_bytes // 16} ({expanded.page_size_bytes / spec.page_size_bytes:.2f}x)"
    )

    llama = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    llama.architectures = ["LlamaForCausalLM"]
    assert tuple(kv_cache.cache_layout(llama)) == (2, 16, False)


def test_quantized_checkpoint_fails_at_start_up():
    from tpu_plugin.models.deepseek_v3 import check_config

    cfg = CONFIGS["dsv3-qlora-interleave"]()
    cfg.quantization_config = {"quant_method": "fp8"}
    with pytest.raises(ValueError, match="dequantized"):
        check_config(cfg)
