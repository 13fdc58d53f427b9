"""Shared fixtures: the embedded SmolLM2, small random-weight checkpoints, HF references.

Every test runs the plugin on JAX's CPU backend (``TPU_PLUGIN_DEVICE=cpu``), as CI does.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TPU_PLUGIN_DEVICE", "cpu")
# libtpu is installed for the TPU compile tests (tests/tpu): JAX's own backend here is the CPU,
# so it never tries to open a TPU (and print that it finds no chips) in a test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engines compile buckets on first use in tests (seconds each on 2 cores, dozens per engine);
# tests/e2e/test_precompile.py turns precompilation on where it is what is tested.
os.environ.setdefault("TPU_PLUGIN_PRECOMPILE", "0")

import pytest  # noqa: E402

PROMPT_LENGTHS = (3, 17, 5, 40, 9, 1, 28, 12)  # 8 ragged prompts, submitted together
# Prompts for sliding-window models: all longer than the tests' window of 16 tokens.
LONG_PROMPT_LENGTHS = (23, 41, 20, 60, 33, 27, 52, 38)
# The dimensions of every family's test checkpoint: small enough for seconds on a CPU.
SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from tpu_plugin.tools.build_smollm2 import build

    return build()


def make_random_checkpoint(
    out_dir: Path, config, seed: int = 0, norm_noise: float = 0.0, dtype: str = "float32"
) -> Path:
    """Saves a random-weight model of ``config`` (a transformers config) to ``out_dir``.

    Weights are drawn with a large init scale so logits are well separated and greedy
    decoding is not decided by rounding-level ties. HF initialises norm weights to a constant
    (1, or 0 for Gemma's ``1 + weight`` form), which would hide a wrong norm formula:
    ``norm_noise`` adds that much Gaussian noise to every norm weight. ``dtype`` is the saved
    checkpoint's dtype (``"bfloat16"`` to test loading a bf16 checkpoint).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config.initializer_range = 0.5
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if norm_noise:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(torch.randn_like(param) * norm_noise)
    model.to(getattr(torch, dtype)).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def random_prompts(vocab_size: int, lengths=PROMPT_LENGTHS, seed: int = 1) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, n).tolist() for n in lengths]


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Hugging Face transformers (PyTorch, fp32) greedy continuations, one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return torch_greedy(model, prompts, max_new_tokens)


def torch_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """A loaded PyTorch causal LM's (HF, or HF + PEFT) greedy continuations of exactly
    ``max_new_tokens`` each (no EOS stop), one prompt at a time so no padding enters."""
    import torch

    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                min_new_tokens=max_new_tokens,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def hf_last_logits(model_dir: Path, prompts: list[list[int]]):
    """HF fp32 logits at the last position of each prompt, ``[len(prompts), vocab]``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return torch_last_logits(model, prompts)


def torch_last_logits(model, prompts: list[list[int]]):
    """A loaded PyTorch causal LM's logits at each prompt's last position, ``[prompts, vocab]``."""
    import numpy as np
    import torch

    with torch.no_grad():
        return np.stack([model(torch.tensor([p])).logits[0, -1].numpy() for p in prompts])


def jax_last_logits(model_dir: Path, prompts: list[list[int]], dtype=None, quant=None):
    """The port's last-position logits (float32 numpy), each prompt alone through fresh pages.

    Runs the loaded flax model directly (no vLLM), with one sequence per call and pages of 16
    tokens, so a mismatch points at the model rather than at batching. ``dtype`` is the
    serving dtype (default float32); ``quant`` a ``tpu_plugin.models.quantization
    .Quantization`` (quantized layers, and the KV pages' dtype).
    """
    import jax.numpy as jnp
    import numpy as np
    from transformers import AutoConfig

    from tpu_plugin.layers.attention import AttentionMetadata
    from tpu_plugin.models.llama import head_dim_of
    from tpu_plugin.models.loader import load_model

    dtype = dtype or jnp.float32
    cfg = AutoConfig.from_pretrained(model_dir)
    model = load_model(str(model_dir), cfg, dtype, quant=quant)
    kv_dtype = (quant.kv_cache_dtype if quant is not None else None) or dtype
    page_size, rows = 16, []
    for prompt in prompts:
        n = len(prompt)
        pages = -(-n // page_size)
        shape = (pages, page_size, cfg.num_key_value_heads, head_dim_of(cfg))
        caches = [
            (jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype))
            for _ in range(cfg.num_hidden_layers)
        ]
        md = AttentionMetadata(
            slot_mapping=jnp.arange(n),
            kv_lens=jnp.array([n]),
            page_indices=jnp.arange(pages)[None],
            query_start_loc=jnp.array([0, n]),
            num_seqs=jnp.array([1]),
        )
        _, hidden = model(caches, jnp.array(prompt), jnp.arange(n), md)
        rows.append(np.asarray(model.compute_logits(hidden[-1:]), np.float32)[0])
    return np.stack(rows)


def max_rel_error(ours, theirs) -> float:
    """``max |ours - theirs| / max |theirs|``: the parity metric of every model test."""
    import numpy as np

    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def assert_logits_match_hf(
    model_dir: Path, prompts: list[list[int]], label: str, tol: float = 1e-4, dtype=None
) -> float:
    """Checks the port's last-position logits against HF fp32; returns (and prints) the error."""
    rel = max_rel_error(
        jax_last_logits(model_dir, prompts, dtype), hf_last_logits(model_dir, prompts)
    )
    print(f"{label}: last-position logits rel. error {rel:.2e} (tolerance {tol:.0e})")
    assert rel <= tol, f"{label}: logits rel. error {rel:.2e} > {tol:.0e}"
    return rel


def assert_greedy_matches_hf(
    make_llm, model_dir: Path, prompts: list[list[int]], max_tokens: int = 32
) -> None:
    """Greedy tokens through ``vllm.LLM`` (ragged batch, fp32) equal HF's, prompt by prompt."""
    expected = hf_greedy(model_dir, prompts, max_tokens)
    llm = make_llm(model_dir, skip_tokenizer_init=True, dtype="float32")
    got = greedy_tokens(llm, prompts, max_tokens)
    mismatched = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
    print(f"greedy: {len(prompts) - len(mismatched)}/{len(prompts)} prompts identical")
    assert not mismatched, f"prompts {mismatched} differ from HF greedy"


@pytest.fixture
def make_llm() -> Iterator:
    """Builds ``vllm.LLM`` instances and shuts their engines down after the test."""
    created = []

    def build(model: Path | str, **kwargs):
        from vllm import LLM

        kwargs.setdefault("max_model_len", 512)
        kwargs.setdefault("kv_cache_memory_bytes", 64 * 2**20)
        kwargs.setdefault("max_num_seqs", 16)
        llm = LLM(model=str(model), **kwargs)
        created.append(llm)
        return llm

    yield build
    for llm in created:
        llm.llm_engine.engine_core.shutdown()
    created.clear()
    gc.collect()


def greedy_tokens(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]
