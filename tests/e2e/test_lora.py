"""Multi-LoRA through ``vllm.LLM``: many adapters and the base model in one batch.

Adapters made by PEFT on small random bases (Llama, Qwen3; ranks 2-8, different projections,
rsLoRA and rank/alpha patterns). Each prompt picks an adapter by ``LoRARequest`` (or none);
greedy tokens must equal HF + PEFT's for that adapter. The engine holds fewer device slots
(``max_loras=2``) and host copies (``max_cpu_loras=3``) than there are adapters, so vLLM's
manager evicts and reloads while the batch runs. Bad adapters are refused with a clear error
and the engine keeps serving; start-up refuses what LoRA does not support here.
"""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, Qwen3Config

from tests.conftest import SMALL, make_random_checkpoint, random_prompts
from tests.lora_adapters import expected_greedy, make_adapter, make_adapters

MAX_TOKENS = 12
LORA_ARGS = dict(enable_lora=True, max_loras=2, max_cpu_loras=3, max_lora_rank=8)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True),
}
CHOICE = [0, 1, -1, 2, 3, 1, -1, 0, 3, 2]  # adapter of each prompt (-1: the base model)
LENGTHS = (5, 17, 3, 40, 9, 1, 28, 12, 6, 21)


def lora_requests(adapters) -> list:
    from vllm.lora.request import LoRARequest

    return [LoRARequest(f"adapter{i}", i + 1, str(path)) for i, path in enumerate(adapters)]


def generate(llm, prompts, choice, requests) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        params,
        lora_request=[requests[c] if c >= 0 else None for c in choice],
        use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.slow  # ~90 s per base on 2 cores (the JAX-level parity runs by default)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_batch_matches_peft(tmp_path, make_llm, name):
    base = make_random_checkpoint(tmp_path / name, CONFIGS[name](), norm_noise=0.2)
    adapters = make_adapters(tmp_path, base)
    prompts = random_prompts(SMALL["vocab_size"], LENGTHS)
    expected = expected_greedy(base, adapters, prompts, CHOICE, MAX_TOKENS)
    llm = make_llm(base, skip_tokenizer_init=True, dtype="float32", **LORA_ARGS)
    got = generate(llm, prompts, CHOICE, lora_requests(adapters))
    for i, which in enumerate(CHOICE):
        print(f"{name} prompt {i} adapter {which}: identical {got[i] == expected[i]}")
    assert got == expected
    base_only = expected_greedy(base, adapters, prompts, [-1] * len(prompts), MAX_TOKENS)
    assert all(got[i] != base_only[i] for i, c in enumerate(CHOICE) if c >= 0)


@pytest.mark.slow  # ~90 s on 2 cores
def test_bad_adapters_are_refused_and_the_engine_keeps_serving(tmp_path, make_llm):
    base = make_random_checkpoint(tmp_path / "llama", CONFIGS["llama"]())
    wider = make_random_checkpoint(tmp_path / "wider", LlamaConfig(**{**SMALL, "hidden_size": 96}))
    deeper = make_random_checkpoint(
        tmp_path / "deeper", LlamaConfig(**{**SMALL, "num_hidden_layers": 3})
    )
    good = make_adapter(tmp_path / "good", base, 4, ["q_proj", "down_proj"], seed=1)
    too_high = make_adapter(tmp_path / "rank16", base, 16, ["q_proj"], seed=2)
    foreign = make_adapter(tmp_path / "foreign", wider, 4, ["q_proj"], seed=3)
    extra_layer = make_adapter(tmp_path / "layer2", deeper, 4, ["k_proj"], seed=4)
    head = make_adapter(tmp_path / "head", base, 4, ["q_proj", "lm_head"], seed=5)
    llm = make_llm(base, skip_tokenizer_init=True, dtype="float32", **LORA_ARGS)
    [good_req, high_req, foreign_req, layer_req, head_req] = lora_requests(
        [good, too_high, foreign, extra_layer, head]
    )
    with pytest.raises(Exception, match="LoRA rank 16 is greater than max_lora_rank 8"):
        llm.llm_engine.add_lora(high_req)
    with pytest.raises(Exception, match="trained for another base model"):
        llm.llm_engine.add_lora(foreign_req)
    with pytest.raises(Exception, match="the base model has 2 layers"):
        llm.llm_engine.add_lora(layer_req)
    with pytest.raises(Exception, match=r"expected target modules in .* but received .*lm_head"):
        llm.llm_engine.add_lora(head_req)  # a module this plugin does not adapt
    assert llm.llm_engine.add_lora(good_req)
    assert set(llm.llm_engine.list_loras()) == {good_req.lora_int_id}  # a list over RPC
    prompts = random_prompts(SMALL["vocab_size"], (4, 9))
    got = generate(llm, prompts, [0, -1], [good_req])
    assert got == expected_greedy(base, [good], prompts, [0, -1], MAX_TOKENS)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (dict(fully_sharded_loras=True), "drop --fully-sharded-loras"),
        (dict(runner="pooling"), "generative models only"),
        (dict(dtype="float32", lora_dtype="bfloat16"), "drop --lora-dtype bfloat16"),
        (dict(enable_moe_shared_loras=True), "drop --enable-moe-shared-loras"),
        (dict(specialize_active_lora=True), "drop --specialize-active-lora"),
        (dict(lora_target_modules=["q_proj", "lm_head"]), "--lora-target-modules lm_head"),
    ],
)
def test_unsupported_lora_configurations_fail_at_start_up(tmp_path, extra, message):
    from vllm import LLM

    base = make_random_checkpoint(tmp_path / "llama", CONFIGS["llama"]())
    with pytest.raises(Exception, match=message):
        LLM(model=str(base), skip_tokenizer_init=True, **LORA_ARGS, **extra)
