"""N-gram speculative decoding on SmolLM2-135M (CPU): acceptance and speed, with vs without.

    python benchmarks/bench_spec_decode.py [--requests 1 4] [--new-tokens 128] [--k 4]

Prompts ask the model to repeat or edit text it was given (a list, code, JSON), where n-gram
drafts from the prompt should be accepted often. For each batch size it runs the same greedy
requests through ``vllm.LLM`` without speculation and with ``--speculative-config``
``{"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4,
"prompt_lookup_min": 2}``, each after one warm-up pass of the same requests (compilation
excluded), checks that the outputs are identical token for token, and prints tokens/s of
both, the acceptance rate and the mean acceptance length from vLLM's spec-decode counters.
"""

from __future__ import annotations

import argparse
import os
import time

ITEMS = "apples, bread, carrots, dates, eggs, flour, grapes, honey, ice cream, jam, kale, lemons"
CODE = """def moving_average(values, window):
    result = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        if index >= window - 1:
            result.append(total / window)
    return result"""
JSON = (
    '{"name": "Ada Lovelace", "age": 36, "city": "London", "languages": ["English", "French"],'
    ' "occupation": "mathematician", "known_for": "the first published computer program"}'
)
QUESTIONS = [
    f"Repeat this shopping list exactly, one item per line: {ITEMS}",
    f"Rewrite this Python function, renaming `values` to `samples`:\n\n{CODE}",
    f"Copy this JSON object and change the age to 37:\n\n{JSON}",
    "Count from 1 to 60, separated by commas.",
]


def counters(llm) -> dict[str, float]:
    values: dict[str, float] = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode_num") and hasattr(metric, "value"):
            values[metric.name] = values.get(metric.name, 0.0) + metric.value
    return values


def run(model: str, prompts: list[str], new_tokens: int, spec: dict | None) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=8,
        kv_cache_memory_bytes=256 << 20,
        speculative_config=spec,
        disable_log_stats=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)  # warm-up: compiles this run's shapes
    warmup = time.perf_counter() - start
    before = counters(llm)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = counters(llm)
    llm.llm_engine.engine_core.shutdown()
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return {
        "tokens": tokens,
        "texts": [o.outputs[0].text for o in outs],
        "tok_s": sum(map(len, tokens)) / elapsed,
        "warmup_s": warmup,
        "drafts": diff.get("vllm:spec_decode_num_drafts", 0.0),
        "draft_tokens": diff.get("vllm:spec_decode_num_draft_tokens", 0.0),
        "accepted": diff.get("vllm:spec_decode_num_accepted_tokens", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    args = parser.parse_args()
    os.environ.setdefault("TPU_PLUGIN_DEVICE", "cpu")
    model = args.model
    if model is None:
        from tpu_plugin.tools.build_smollm2 import build

        model = str(build())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    spec = {
        "method": "ngram",
        "num_speculative_tokens": args.k,
        "prompt_lookup_max": 4,
        "prompt_lookup_min": 2,
    }
    rows = []
    for n in args.requests:
        prompts = [chats[i % len(chats)] for i in range(n)]
        plain = run(model, prompts, args.new_tokens, None)
        with_spec = run(model, prompts, args.new_tokens, spec)
        identical = plain["tokens"] == with_spec["tokens"]
        rate = with_spec["accepted"] / max(with_spec["draft_tokens"], 1)
        length = 1 + with_spec["accepted"] / max(with_spec["drafts"], 1)
        rows.append((n, plain["tok_s"], with_spec["tok_s"], rate, length, identical))
        if n == args.requests[0]:
            print("\nfirst output with speculation:\n" + with_spec["texts"][0][:400] + "\n")
        if not identical:
            pairs = zip(plain["tokens"], with_spec["tokens"], strict=True)
            bad = [i for i, (a, b) in enumerate(pairs) if a != b]
            print(f"requests={n}: greedy outputs differ for requests {bad}")
    print(f"SmolLM2-135M fp32, JAX CPU, greedy, {args.new_tokens} new tokens, n-gram k={args.k}")
    print(
        "| requests | tok/s plain | tok/s n-gram | speed-up | acceptance "
        "| mean acceptance length | identical |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, plain_s, spec_s, rate, length, identical in rows:
        print(
            f"| {n} | {plain_s:.1f} | {spec_s:.1f} | {spec_s / plain_s:.2f}x | {rate:.1%} "
            f"| {length:.2f} | {'yes' if identical else 'NO'} |"
        )


if __name__ == "__main__":
    main()
