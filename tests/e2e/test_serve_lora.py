"""``vllm serve --enable-lora --lora-modules name=path`` end to end with the ``openai`` client.

SmolLM2 (real weights, float32) with PEFT adapters of its own: each request picks an adapter
by its ``model`` name (or the base model's name), requests run concurrently so one batch mixes
adapters and the base model, and every greedy continuation must equal HF + PEFT's for its
adapter. Three adapters share two device slots (``--max-loras 2``). At runtime
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) an adapter of too high rank or for another base model is
a 400 naming the reason, a good one loads, serves and unloads, and the server keeps serving.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from transformers import LlamaConfig

from tests.conftest import SMALL, make_random_checkpoint, random_prompts
from tests.e2e.server import API_KEY, vllm_server
from tests.lora_adapters import expected_greedy, make_adapter

MAX_TOKENS = 8
# (rank, targets) of the adapters served from start-up
SPECS = [(8, ["q_proj", "v_proj", "down_proj"]), (4, ["o_proj", "gate_proj"]), (2, ["k_proj"])]
# two prompts, each under every adapter and the base model (-1), all in one batch
CHOICE = [0, 1, 2, -1, 2, -1, 0, 1]
PROMPT_OF = [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.slow  # one server start-up and HF + PEFT references (~5-10 min on 2 busy cores)
def test_serve_lora_modules_mixed_batch_and_runtime_loading(tmp_path, smollm2_dir, monkeypatch):
    adapters = [
        make_adapter(tmp_path / f"a{i}", smollm2_dir, rank, targets, seed=10 + i, scale=0.15)
        for i, (rank, targets) in enumerate(SPECS)
    ]
    distinct = random_prompts(1000, (11, 6))
    prompts = [distinct[i] for i in PROMPT_OF]
    expected = expected_greedy(smollm2_dir, adapters, prompts, CHOICE, MAX_TOKENS)
    for which in range(len(distinct)):  # every adapter changes each prompt's continuation
        outputs = [tuple(expected[i]) for i, p in enumerate(PROMPT_OF) if p == which]
        assert len(set(outputs)) == len(outputs), outputs

    too_high = make_adapter(tmp_path / "rank16", smollm2_dir, 16, ["q_proj"], seed=20)
    other = make_random_checkpoint(tmp_path / "other", LlamaConfig(**SMALL))
    foreign = make_adapter(tmp_path / "foreign", other, 4, ["q_proj"], seed=21)
    late = make_adapter(tmp_path / "late", smollm2_dir, 4, ["up_proj"], seed=22, scale=0.15)

    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    modules = [f"a{i}={path}" for i, path in enumerate(adapters)]
    args = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8"]
    args += ["--kv-cache-memory-bytes", str(64 * 2**20), "--enable-lora", "--max-loras", "2"]
    args += ["--max-lora-rank", "8", "--lora-modules", *modules]
    with vllm_server(smollm2_dir, *args, api_key=API_KEY, startup_timeout=900) as server:
        client = openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0)
        names = {m.id for m in client.models.list().data}
        base_name = str(smollm2_dir)
        assert {"a0", "a1", "a2", base_name} <= names

        def complete(i: int) -> list[int]:
            model = f"a{CHOICE[i]}" if CHOICE[i] >= 0 else base_name
            return complete_tokens(client, model, prompts[i])

        with ThreadPoolExecutor(len(prompts)) as pool:  # one batch of mixed adapters
            got = list(pool.map(complete, range(len(prompts))))
        assert got == expected

        load = server.v1 + "/load_lora_adapter"
        for name, path, reason in [
            ("high", too_high, "LoRA rank 16 is greater than max_lora_rank 8"),
            ("foreign", foreign, "trained for another base model"),
        ]:
            reply = requests.post(
                load, json={"lora_name": name, "lora_path": str(path)}, headers=server.headers()
            )
            assert reply.status_code == 400, reply.text
            assert reason in reply.text
        reply = requests.post(
            load, json={"lora_name": "late", "lora_path": str(late)}, headers=server.headers()
        )
        assert reply.status_code == 200, reply.text
        [want] = expected_greedy(smollm2_dir, [late], prompts[:1], [0], MAX_TOKENS)
        assert complete_tokens(client, "late", prompts[0]) == want
        reply = requests.post(
            server.v1 + "/unload_lora_adapter", json={"lora_name": "late"}, headers=server.headers()
        )
        assert reply.status_code == 200, reply.text
        assert complete_tokens(client, "a1", prompts[1]) == expected[1]


def complete_tokens(client: openai.OpenAI, model: str, prompt: list[int]) -> list[int]:
    """Greedy completion token ids of the prompt ``prompt`` (token ids) under ``model``."""
    out = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    return list(out.choices[0].token_ids)
