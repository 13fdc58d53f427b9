"""The torchax path: vLLM's own PyTorch models run through torchax against HF transformers.

Small random-weight checkpoints of architectures with no JAX port (OPT, GPT-2, Falcon are vLLM
model classes; GPT-NeoX and Phi are served by vLLM's Transformers backend). Each runs as one
ragged batch of 8 prompts through the jitted torchax step and the plugin's paged attention:
last-position logits against HF fp32, then 32 greedy tokens decoded in the same ragged batch.
Llama runs both ways (``TPU_PLUGIN_MODEL_IMPL=torchax`` against the native JAX port) and once
end to end through ``vllm.LLM``.

HF references are computed before vLLM builds a model: vLLM's Transformers backend decorates
HF's model classes in place when it loads one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import transformers

from tests.conftest import (
    SMALL,
    assert_greedy_matches_hf,
    hf_greedy,
    hf_last_logits,
    make_random_checkpoint,
    max_rel_error,
    random_prompts,
)

NEW_TOKENS = 32
PAGE = 16
_DIMS = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)

CONFIGS = {
    "opt": lambda: transformers.OPTConfig(
        **_DIMS, ffn_dim=128, max_position_embeddings=512, word_embed_proj_dim=64
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=512
    ),
    "falcon": lambda: transformers.FalconConfig(
        **_DIMS, new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **_DIMS, intermediate_size=128, max_position_embeddings=512, rotary_pct=0.25
    ),
    "phi": lambda: transformers.PhiConfig(
        **_DIMS, intermediate_size=128, max_position_embeddings=512, partial_rotary_factor=0.5
    ),
    "llama": lambda: transformers.LlamaConfig(**SMALL),
}
DEFAULT_RUN = ("opt", "gpt2", "falcon")
SLOW = ("gpt_neox", "phi")


def vllm_config_for(model_dir: Path):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=str(model_dir),
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=512,
        kv_cache_memory_bytes=16 * 2**20,
    ).create_engine_config()


def ragged_greedy(forward, params, dims, prompts: list[list[int]], new_tokens: int, dtype=None):
    """``(last-prompt-position logits, greedy tokens)`` through ``forward`` (the runner's
    ``(params, kv_caches, step) -> (kv_caches, logits)`` contract): all prompts prefilled in
    one ragged step, then decoded together one token per step."""
    import jax

    from tpu_plugin.tools.direct_steps import empty_kv_caches, ragged_step

    pages_per_seq = -(-(max(map(len, prompts)) + new_tokens) // PAGE)
    num_pages = pages_per_seq * len(prompts)
    caches = empty_kv_caches(dims, num_pages, PAGE, dtype or np.float32)
    jitted = jax.jit(forward, donate_argnums=(1,))
    step = ragged_step(prompts, [0] * len(prompts), pages_per_seq, num_pages, PAGE)
    caches, logits = jitted(params, caches, step)
    first_logits = np.asarray(logits, np.float32)
    out = [[int(t)] for t in np.argmax(first_logits, axis=-1)]
    for _ in range(new_tokens - 1):
        starts = [len(p) + len(o) - 1 for p, o in zip(prompts, out, strict=True)]
        step = ragged_step([[o[-1]] for o in out], starts, pages_per_seq, num_pages, PAGE)
        caches, logits = jitted(params, caches, step)
        for o, t in zip(out, np.argmax(np.asarray(logits), axis=-1), strict=True):
            o.append(int(t))
    return first_logits, out


def check_against_hf(tmp_path: Path, name: str) -> None:
    from tpu_plugin.models.torchax import TorchaxModel

    model_dir = make_random_checkpoint(tmp_path / name, CONFIGS[name](), norm_noise=0.2)
    prompts = random_prompts(512)
    expected_logits = hf_last_logits(model_dir, prompts)
    expected_tokens = hf_greedy(model_dir, prompts, NEW_TOKENS)

    model = TorchaxModel(vllm_config_for(model_dir))
    logits, tokens = ragged_greedy(
        model.forward, model.params, model.kv_cache_dims, prompts, NEW_TOKENS
    )
    rel = max_rel_error(logits, expected_logits)
    same = sum(a == b for a, b in zip(tokens, expected_tokens, strict=True))
    print(f"{name} (torchax): logits rel. error {rel:.2e}; greedy {same}/{len(prompts)} identical")
    assert rel <= 1e-4, f"{name}: logits rel. error {rel:.2e} > 1e-04"
    assert tokens == expected_tokens, f"{name}: greedy tokens differ from HF"


@pytest.mark.parametrize("name", DEFAULT_RUN)
def test_architecture_without_port_matches_hf(tmp_path, name):
    check_against_hf(tmp_path, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_transformers_backend_architecture_matches_hf(tmp_path, name):
    check_against_hf(tmp_path, name)


def test_llama_torchax_matches_native_and_hf(tmp_path):
    import jax.numpy as jnp
    from transformers import AutoConfig

    from tpu_plugin.models.loader import load_model
    from tpu_plugin.models.torchax import TorchaxModel
    from tpu_plugin.tools.direct_steps import native_forward

    model_dir = make_random_checkpoint(tmp_path / "llama", CONFIGS["llama"](), norm_noise=0.2)
    prompts = random_prompts(512)
    expected = hf_greedy(model_dir, prompts, NEW_TOKENS)

    native = load_model(str(model_dir), AutoConfig.from_pretrained(model_dir), jnp.float32)
    forward, state = native_forward(native)
    dims = (SMALL["num_hidden_layers"], SMALL["num_key_value_heads"], 16)
    native_logits, native_tokens = ragged_greedy(forward, state, dims, prompts, NEW_TOKENS)

    model = TorchaxModel(vllm_config_for(model_dir))
    assert model.kv_cache_dims == dims
    logits, tokens = ragged_greedy(model.forward, model.params, dims, prompts, NEW_TOKENS)
    rel = max_rel_error(logits, native_logits)
    print(f"llama: torchax vs native logits rel. error {rel:.2e}")
    assert rel <= 1e-4
    assert tokens == native_tokens == expected


def test_llama_torchax_through_vllm_llm(tmp_path, make_llm, monkeypatch):
    """The user's path: ``TPU_PLUGIN_MODEL_IMPL=torchax`` with ``vllm.LLM``, ragged batch."""
    monkeypatch.setenv("TPU_PLUGIN_MODEL_IMPL", "torchax")
    model_dir = make_random_checkpoint(tmp_path / "llama", CONFIGS["llama"](), norm_noise=0.2)
    assert_greedy_matches_hf(make_llm, model_dir, random_prompts(512), NEW_TOKENS)


def test_paths_are_chosen_by_model_impl(monkeypatch):
    from tpu_plugin.models.registry import UnsupportedModelError, select_implementation

    monkeypatch.setenv("TPU_PLUGIN_MODEL_IMPL", "auto")
    assert select_implementation(["LlamaForCausalLM"]) == ("jax", "LlamaForCausalLM")
    assert select_implementation(["OPTForCausalLM"]) == ("torchax", "OPTForCausalLM")
    monkeypatch.setenv("TPU_PLUGIN_MODEL_IMPL", "torchax")
    assert select_implementation(["LlamaForCausalLM"]) == ("torchax", "LlamaForCausalLM")
    monkeypatch.setenv("TPU_PLUGIN_MODEL_IMPL", "jax")
    with pytest.raises(UnsupportedModelError, match="OPTForCausalLM has no JAX port.*torchax"):
        select_implementation(["OPTForCausalLM"])


def test_architectures_that_cannot_run_fail_at_start_up_saying_why(tmp_path, monkeypatch):
    from tpu_plugin.models.registry import UnsupportedModelError, check_architecture
    from tpu_plugin.models.torchax import TorchaxModel

    monkeypatch.setenv("TPU_PLUGIN_MODEL_IMPL", "auto")
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM: its state-space"):
        check_architecture(["MambaForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="NoSuchLM: vLLM has no model class"):
        check_architecture(["NoSuchLM"])
    # BLOOM passes the registry but uses ALiBi, which the paged attention kernel lacks: the
    # model build (engine start-up) stops naming it.
    config = transformers.BloomConfig(vocab_size=512, hidden_size=64, n_layer=2, n_head=4)
    model_dir = make_random_checkpoint(tmp_path / "bloom", config)
    with pytest.raises(NotImplementedError, match="ALiBi attention is not supported"):
        TorchaxModel(vllm_config_for(model_dir))


def test_custom_op_without_jax_implementation_fails_naming_it():
    import jax.numpy as jnp
    import torch
    import vllm.model_executor.layers.attention.attention  # noqa: F401  (defines the op)

    from tpu_plugin.models.torchax import ops

    env = ops.torchax_env()
    with pytest.raises(ops.MissingLoweringError, match="vllm::unified_kv_cache_update"):
        with ops.naming_missing_ops(), env:
            key = env.j2t_iso(jnp.ones((2, 2, 4)))
            torch.ops.vllm.unified_kv_cache_update(key, key, "layer")
