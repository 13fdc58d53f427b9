"""Shared fixtures: the embedded SmolLM2, small random-weight checkpoints, HF references.

Every test runs the plugin on JAX's CPU backend (``TPU_PLUGIN_DEVICE=cpu``), as CI does.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TPU_PLUGIN_DEVICE", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

PROMPT_LENGTHS = (3, 17, 5, 40, 9, 1, 28, 12)  # 8 ragged prompts, submitted together


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from tpu_plugin.tools.build_smollm2 import build

    return build()


def make_random_checkpoint(out_dir: Path, config, seed: int = 0) -> Path:
    """Saves a random-weight fp32 model of ``config`` (a transformers config) to ``out_dir``.

    Weights are drawn with a large init scale so logits are well separated and greedy
    decoding is not decided by rounding-level ties.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config.initializer_range = 0.5
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
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
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                min_new_tokens=max_new_tokens,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def hf_last_logits(model_dir: Path, prompts: list[list[int]]):
    """HF fp32 logits at the last position of each prompt, ``[len(prompts), vocab]``."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return np.stack([model(torch.tensor([p])).logits[0, -1].numpy() for p in prompts])


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
