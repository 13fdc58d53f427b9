"""Every sampling parameter through ``vllm.LLM`` against a reference that follows vLLM's rules.

The model is a small random-weight Llama with SmolLM2's tokenizer (so ``bad_words`` and grammars
have text to work on). The reference decodes greedily with Hugging Face transformers one token
at a time and applies vLLM's formulas between forward passes (vLLM's own ``apply_penalties``,
its bad-words rule, min-tokens masking, logit bias and allowed ids): the plugin's tokens must be
identical, with all requests submitted together so that every parameter shares one batch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SMALL, make_random_checkpoint

MAX_TOKENS = 12


def make_tokenized_random_llama(out_dir: Path, smollm2_dir: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's vocabulary, tokenizer and chat template.

    Built once per test session (both e2e sampling modules use it).
    """
    from transformers import LlamaConfig

    if (out_dir / "tokenizer.json").exists():
        return out_dir

    config = LlamaConfig(
        **(SMALL | dict(vocab_size=49152, max_position_embeddings=1024)),
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    make_random_checkpoint(out_dir, config, seed=7)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, out_dir / name)
    return out_dir


@pytest.fixture(scope="module")
def model_dir(smollm2_dir, tmp_path_factory) -> Path:
    return make_tokenized_random_llama(
        tmp_path_factory.getbasetemp() / "tokenized-llama", smollm2_dir
    )


@pytest.fixture(scope="module")
def llm(model_dir):
    from vllm import LLM

    # 32 tokens a step: the 60-token prompt below is prefilled in chunks. Buckets compile on
    # first use: these tests use a few of them, precompiling all would take longer.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TPU_PLUGIN_PRECOMPILE", "0")
        engine = LLM(
            model=str(model_dir),
            dtype="float32",
            max_model_len=256,
            max_num_seqs=16,
            max_num_batched_tokens=32,
            kv_cache_memory_bytes=64 * 2**20,
        )
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def prompts(n: int, length: int = 7, seed: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 49152, length).tolist() for _ in range(n)]


def reference_greedy(hf_model, prompt: list[int], params) -> list[int]:
    """Greedy decoding with vLLM's processors applied in vLLM's order, one request alone."""
    from vllm.model_executor.layers.utils import apply_penalties

    output: list[int] = []
    for _ in range(params.max_tokens):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + output])).logits[:, -1].float()
        vocab = logits.shape[-1]
        if params.allowed_token_ids:
            keep = torch.zeros(vocab, dtype=torch.bool)
            keep[params.allowed_token_ids] = True
            logits[:, ~keep] = float("-inf")
        for word in params.bad_words_token_ids or []:
            prefix = word[:-1]
            if len(word) <= len(output) + 1 and output[len(output) - len(prefix) :] == prefix:
                logits[0, word[-1]] = float("-inf")
        if len(output) < params.min_tokens:
            logits[0, sorted(params.all_stop_token_ids)] = float("-inf")
        for token, bias in (params.logit_bias or {}).items():
            logits[0, token] += bias
        logits = apply_penalties(
            logits,
            torch.tensor([prompt]),
            torch.tensor([output or [vocab]]),
            torch.tensor([params.presence_penalty]),
            torch.tensor([params.frequency_penalty]),
            torch.tensor([params.repetition_penalty]),
        )
        token = int(logits.argmax(-1))
        output.append(token)
        if token in params.all_stop_token_ids and len(output) >= params.min_tokens:
            break
    return output


def test_mixed_parameters_in_one_batch_match_the_reference(llm, hf_model):
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    batch = prompts(9)
    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    first = llm.generate([{"prompt_token_ids": p} for p in batch], plain, use_tqdm=False)
    greedy = [list(o.outputs[0].token_ids) for o in first]

    # A bad word the model would produce: a greedy token that is a word of its own.
    banned = next(
        text
        for t in greedy[2]
        if (text := tokenizer.decode([t]).strip()).isalpha()
        and tokenizer.encode(text, add_special_tokens=False) == [t]
    )
    eos = tokenizer.eos_token_id

    def greedy_params(**kwargs) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **kwargs)

    params = [
        greedy_params(),
        greedy_params(logit_bias={1234: 100.0}),
        greedy_params(bad_words=[banned]),
        greedy_params(allowed_token_ids=[500, 600, 700, greedy[3][0]]),
        greedy_params(min_tokens=6, logit_bias={eos: 100.0}),  # eos forced, but not before 6
        greedy_params(repetition_penalty=1.8),
        greedy_params(frequency_penalty=1.5, presence_penalty=0.5),
        greedy_params(stop_token_ids=[greedy[7][1]], min_tokens=4),
        SamplingParams(temperature=1.0, min_p=0.2, top_k=50, seed=11, max_tokens=MAX_TOKENS),
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outputs]
    for i in range(8):
        p = outputs[i].outputs[0]
        # vLLM's own post-processing has filled the tokenized fields (bad words, stop ids).
        expected = reference_greedy(hf_model, batch[i], llm_params(llm, params[i]))
        assert got[i] == expected, f"request {i}: {got[i]} != {expected} ({p.finish_reason})"
    assert got[0] == greedy[0]
    assert got[1] == [1234] * MAX_TOKENS
    assert got[2] != greedy[2]
    assert set(got[3]) <= {500, 600, 700, greedy[3][0]}
    assert len(got[4]) == 7 and got[4][-1] == eos and eos not in got[4][:6]
    assert outputs[4].outputs[0].finish_reason == "stop"
    assert len(got[7]) >= 4 and greedy[7][1] not in got[7][:4]
    assert len(got[8]) == MAX_TOKENS


def llm_params(llm, params):
    """``params`` as the engine sees them: eos and tokenized bad words filled in by vLLM."""
    processed = params.clone()
    tokenizer = llm.get_tokenizer()
    processed.update_from_generation_config({}, tokenizer.eos_token_id)
    processed.update_from_tokenizer(tokenizer)
    return processed


def test_n_returns_independent_samples(llm):
    from vllm import SamplingParams

    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompts(1)[0]}], params, use_tqdm=False)[0]
    samples = [list(c.token_ids) for c in out.outputs]
    assert len(samples) == 2 and all(len(s) == MAX_TOKENS for s in samples)
    assert samples[0] != samples[1]


def test_prompt_logprobs_match_hf_with_chunked_prefill(llm, hf_model):
    from vllm import SamplingParams

    long_prompt, short_prompt = prompts(1, 60, seed=9)[0], prompts(1, 5, seed=10)[0]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3, logprobs=2)
    # In the same batch: logprobs of chosen ids (vLLM's generative scoring).
    scoring = SamplingParams(temperature=0, max_tokens=3, logprob_token_ids=[5, 77, 900])
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in (long_prompt, short_prompt, short_prompt)],
        [params, params, scoring],
        use_tqdm=False,
    )
    scored = outputs.pop()
    generated = list(scored.outputs[0].token_ids)
    with torch.no_grad():
        logits = hf_model(torch.tensor([short_prompt + generated[:-1]])).logits[0].float()
    expected = torch.log_softmax(logits, -1).numpy()[len(short_prompt) - 1 :]
    for row, entry in zip(expected, scored.outputs[0].logprobs, strict=True):
        for token in (5, 77, 900):
            assert entry[token].logprob == pytest.approx(row[token], abs=1e-4)
    for prompt, out in zip((long_prompt, short_prompt), outputs, strict=True):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt])).logits[0].float()
        expected = torch.log_softmax(logits, -1).numpy()
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for pos in range(1, len(prompt)):
            row, token = expected[pos - 1], prompt[pos]
            entry = got[pos]
            assert entry[token].logprob == pytest.approx(row[token], abs=1e-4)
            # vLLM's rank: tokens at least as likely (float rounding decides near-ties).
            value = row[token]
            assert (row > value + 1e-4).sum() < entry[token].rank <= (row >= value - 1e-4).sum()
            top = np.argsort(-row)[:3]
            assert {t for t, lp in entry.items() if lp.rank <= 3} >= set(top.tolist()) - {token}
            for t in top:
                assert entry[int(t)].logprob == pytest.approx(row[t], abs=1e-4)
        assert len(out.outputs[0].logprobs) == 2
