"""N-gram speculative decoding through ``vllm.LLM``: greedy tokens equal the run without it.

A random-weight Llama falls into repeating loops under greedy decoding, which is what n-gram
drafts catch, so drafts are proposed and accepted here; the acceptance rate comes from vLLM's
own spec-decode counters (``LLM.get_metrics``), which the scheduler fills from the runner's
variable-length ``sampled_token_ids``.
"""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from tests.conftest import SMALL, make_random_checkpoint, random_prompts

SPEC = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
}


def _prompts() -> list[list[int]]:
    """Ragged prompts; some repeat a phrase, so drafts exist from the first decode step."""
    base = random_prompts(512, lengths=(3, 17, 5, 40, 9, 28))
    phrase = random_prompts(512, lengths=(6,), seed=7)[0]
    return base + [phrase * 4, [5, 6] + phrase * 3]


def _counters(llm) -> dict[str, float]:
    values: dict[str, float] = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode_num"):
            values[metric.name] = values.get(metric.name, 0) + getattr(metric, "value", 0)
    return values


def _run(llm, prompts):
    from vllm import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    # Features drafts do not combine with: these requests decode without drafts, in the batch.
    penalized = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, presence_penalty=1)
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    # Random rows go through the random rejection rule: only their length is comparable.
    sampled = SamplingParams(temperature=0.8, top_k=40, seed=5, max_tokens=40, ignore_eos=True)
    params = [greedy] * len(prompts) + [penalized, with_logprobs, sampled]
    inputs = [{"prompt_token_ids": p} for p in prompts + prompts[-2:] + prompts[-1:]]
    outs = llm.generate(inputs, params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert len(tokens[-1]) == 40 and all(0 <= t < 512 for t in tokens[-1])
    logprobs = [
        max(s.values(), key=lambda x: x.logprob).logprob for s in outs[-2].outputs[0].logprobs
    ]
    return tokens[:-1], logprobs


def test_ngram_greedy_matches_no_speculation(tmp_path, make_llm):
    model_dir = make_random_checkpoint(tmp_path / "llama", LlamaConfig(**SMALL))
    prompts = _prompts()
    common = dict(
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=128,
        max_num_seqs=4,  # 10 requests: they wait, join and leave mid-run
        max_num_batched_tokens=32,  # chunked prefill next to verification steps
        kv_cache_memory_bytes=8 * 2**20,
        disable_log_stats=False,
    )
    results = {}
    for spec in (None, SPEC):
        llm = make_llm(model_dir, speculative_config=spec, **common)
        if spec is not None:  # drafts come from each step's host tokens: synchronous
            assert not llm.llm_engine.vllm_config.scheduler_config.async_scheduling
        results[spec is not None] = _run(llm, prompts)
        counters = _counters(llm)
        llm.llm_engine.engine_core.shutdown()
    drafted = counters.get("vllm:spec_decode_num_draft_tokens", 0)
    accepted = counters.get("vllm:spec_decode_num_accepted_tokens", 0)
    drafts = counters.get("vllm:spec_decode_num_drafts", 0)
    print(
        f"n-gram k=3: {drafted:.0f} draft tokens in {drafts:.0f} drafts, {accepted:.0f} "
        f"accepted: acceptance rate {accepted / max(drafted, 1):.1%}, mean acceptance length "
        f"{1 + accepted / max(drafts, 1):.2f}"
    )
    (plain, plain_lp), (spec, spec_lp) = results[False], results[True]
    mismatched = [i for i, (a, b) in enumerate(zip(plain, spec, strict=True)) if a != b]
    assert not mismatched, f"requests {mismatched} differ with n-gram speculation"
    assert spec_lp == pytest.approx(plain_lp, abs=1e-4)
    assert drafted > 0 and accepted > 0, "no draft was proposed or accepted"


def test_unsupported_method_fails_at_startup(tmp_path):
    """Other methods stop at configuration time (no weights read), naming what works."""
    from tests.e2e.server import serve_until_exit

    LlamaConfig(**SMALL, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llama")
    spec = '{"method": "ngram_gpu", "num_speculative_tokens": 3}'
    result = serve_until_exit(
        tmp_path / "llama", "--skip-tokenizer-init", "--speculative-config", spec
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if "n-gram proposer only" in line]
    assert len(lines) == 1 and "ngram_gpu" in lines[0], output[-3000:]


# slow: 42 s; the offline ngram test above covers the algorithm in the default suite
@pytest.mark.slow
def test_serve_with_speculative_config(smollm2_server, smollm2_dir):
    """``vllm serve --speculative-config``: the same completion as the plain server, with
    drafts accepted (vLLM's ``/metrics`` counters)."""
    import json

    import openai

    from tests.e2e.conftest import SERVE_ARGS
    from tests.e2e.server import API_KEY, vllm_server

    items = "apples, bread, carrots, dates, eggs, flour, grapes, honey, jam, kale"
    request = dict(
        messages=[{"role": "user", "content": f"Repeat this list, one item a line: {items}"}],
        max_tokens=48,
        temperature=0,
    )
    spec = json.dumps({**SPEC, "prompt_lookup_min": 2, "prompt_lookup_max": 4})
    args = (*SERVE_ARGS, "--speculative-config", spec)
    with vllm_server(smollm2_dir, *args, api_key=API_KEY) as server:
        client = openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0)
        model = client.models.list().data[0].id
        got = client.chat.completions.create(model=model, **request).choices[0].message.content
        metrics = server.metrics()
    plain = openai.OpenAI(base_url=smollm2_server.v1, api_key=API_KEY, max_retries=0)
    want = plain.chat.completions.create(model=model, **request).choices[0].message.content
    drafted = metrics["vllm:spec_decode_num_draft_tokens_total"]
    accepted = metrics["vllm:spec_decode_num_accepted_tokens_total"]
    print(f"vllm serve n-gram: {accepted:.0f}/{drafted:.0f} draft tokens accepted")
    assert got == want
    assert accepted > 0
