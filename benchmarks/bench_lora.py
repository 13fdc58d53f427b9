"""Multi-LoRA decode throughput: 0, 1, 4 and 8 adapters in one batch against the base model.

    python3 benchmarks/bench_lora.py --device gpu            # Llama-3-8B shape, bf16, rank 16
    python3 benchmarks/bench_lora.py --device cpu --smoke    # 2-layer model, the CPU figure

One process, one run:

1. a Llama-shaped bf16 checkpoint with random weights (``gpu_suite.write_checkpoint``; an
   existing one at the same path is reused) and ``max(--adapters)`` LoRA adapters of rank
   ``--rank`` on all seven projections, written in PEFT's format (``adapter_config.json`` +
   ``adapter_model.safetensors``, the layout ``peft.save_pretrained`` writes; PEFT itself is
   not needed on the device);
2. the base model: ``vllm.LLM`` without ``--enable-lora``, ``--batch`` requests;
3. ``vllm.LLM(enable_lora=True, max_loras=max(--adapters), max_lora_rank=--rank)``, the same
   requests with 0 adapters (every request on the base model), 1, 4 and 8 different adapters
   spread round robin over the batch.

Each case is timed by ``decode_timing.time_decode``: a warm-up, then the best of two prefill-only
runs (``max_tokens=1``) and a full run, repeated until they compiled nothing in the worker
(``TPU_PLUGIN_PRECOMPILE=0`` keeps both engines' start-up short, so shapes compile on first
use); decode tok/s = batch x (new tokens - 1) / (full - prefill).
The table prints last, every row also as a ratio to the base model's figure.
Results go to ``$OUT/bench_lora.json`` after each case.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

OUT = os.environ.get("OUT", "/tmp")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RESULTS: dict = {}


def save() -> None:
    with open(os.path.join(OUT, "bench_lora.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """``{projection: (in, out)}`` of one Llama decoder layer."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def write_adapter(path: str, base: str, config, rank: int, seed: int) -> int:
    """A random rank-``rank`` PEFT LoRA adapter of every projection; returns its bytes.

    Small entries (std 0.02 for A, 0.01 for B, alpha = 2 rank) keep the random model's
    activations in range; the values do not change the work, only the outputs.
    """
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name, (fan_in, fan_out) in projection_shapes(config).items():
            block = (
                "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            )
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            a = torch.randn(rank, fan_in, generator=gen) * 0.02
            b = torch.randn(fan_out, rank, generator=gen) * 0.01
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(peft_config, f, indent=1)
    return sum(t.numel() * 2 for t in tensors.values())


def time_case(llm, inputs: list, new_tokens: int, lora: list | None) -> dict:
    """``decode_timing.time_decode`` with the case's adapters; the first tokens of 4 requests."""
    from decode_timing import time_decode

    result = time_decode(llm, inputs, new_tokens, lora_request=lora)
    result["first_tokens"] = [list(o.outputs[0].token_ids[:6]) for o in result.pop("outputs")]
    return result


def engine(path: str, args, max_len: int, lora: bool):
    from vllm import LLM

    extra = dict(enable_lora=True, max_loras=max(args.adapters), max_lora_rank=args.rank)
    start = time.perf_counter()
    llm = LLM(
        model=path,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=max_len,
        max_num_seqs=args.batch,
        max_num_batched_tokens=4096 if args.device == "gpu" else 1024,
        enable_prefix_caching=False,  # reruns of the same prompts must recompute
        **({"gpu_memory_utilization": 0.85} if args.device == "gpu" else {}),
        **({"kv_cache_memory_bytes": 512 << 20} if args.device == "cpu" else {}),
        **(extra if lora else {}),
    )
    RESULTS[f"startup_s{'_lora' if lora else ''}"] = time.perf_counter() - start
    return llm


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), required=True)
    parser.add_argument("--smoke", action="store_true", help="2-layer model, short runs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 4, 8])
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (32)")
    parser.add_argument(
        "--lora-first", action="store_true", help="the LoRA engine before the base one"
    )
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    args = parser.parse_args()
    os.environ["TPU_PLUGIN_DEVICE"] = args.device
    os.environ.setdefault("TPU_PLUGIN_PRECOMPILE", "0")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_suite import llama_config, prompts, write_checkpoint

    small = args.smoke or args.device == "cpu"
    prompt_len = args.prompt_len or (64 if small else 512)
    new_tokens = args.new_tokens or (32 if small else 256)
    config = llama_config(small)
    path = "/tmp/llama-smoke" if small else "/tmp/llama-3-8b-random"
    if args.layers:  # the 8B layer shapes, fewer of them: a quick repro of the full model
        config.num_hidden_layers = args.layers
        path += f"-{args.layers}l"
    start = time.perf_counter()
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        RESULTS["weight_bytes"] = json.load(
            open(os.path.join(path, "model.safetensors.index.json"))
        )["metadata"]["total_size"]
    else:
        RESULTS["weight_bytes"] = write_checkpoint(path, config)
    count = max(args.adapters)
    adapters = [f"{path}-lora{i}" for i in range(count)]
    RESULTS["adapter_bytes"] = [
        write_adapter(p, path, config, args.rank, seed=i) for i, p in enumerate(adapters)
    ][:1]
    RESULTS.update(
        setup_s=time.perf_counter() - start,
        device=args.device,
        batch=args.batch,
        rank=args.rank,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
    )
    save()
    inputs = [{"prompt_token_ids": p} for p in prompts(args.batch, prompt_len, config.vocab_size)]
    max_len = prompt_len + new_tokens + 16

    def run_base() -> None:
        llm = engine(path, args, max_len, lora=False)
        RESULTS["base"] = time_case(llm, inputs, new_tokens, None)
        print("base model", RESULTS["base"], flush=True)
        save()
        shutdown(llm)

    def run_lora() -> None:
        from vllm.lora.request import LoRARequest

        requests = [LoRARequest(f"lora{i}", i + 1, p) for i, p in enumerate(adapters)]
        llm = engine(path, args, max_len, lora=True)
        for n in args.adapters:
            lora = [requests[i % n] for i in range(args.batch)] if n else None
            RESULTS[f"adapters@{n}"] = time_case(llm, inputs, new_tokens, lora)
            print(f"{n} adapters", RESULTS[f"adapters@{n}"], flush=True)
            save()
        shutdown(llm)

    RESULTS["order"] = "lora first" if args.lora_first else "base first"
    for run in (run_lora, run_base) if args.lora_first else (run_base, run_lora):
        run()

    base = RESULTS["base"]["decode_tok_s"]
    print(
        f"\n{args.device}: Llama {'2-layer smoke' if small else '3-8B'} shape bf16, batch "
        f"{args.batch}, prompts {prompt_len}, {new_tokens} new tokens, rank {args.rank} on all "
        f"7 projections, max_loras {count} (adapter {RESULTS['adapter_bytes'][0] / 1e6:.1f} MB); "
        f"start-up {RESULTS['startup_s']:.0f} s base, {RESULTS['startup_s_lora']:.0f} s LoRA; "
        f"{RESULTS['order']}"
    )
    print(
        "| engine | adapters in the batch | decode tok/s | vs base model | timed attempts, "
        "compiles in the last |"
    )
    print("|---|---|---|---|---|")
    rounds = RESULTS["base"]["timed_attempts"], RESULTS["base"]["compiles_in_timed_runs"]
    print(f"| base (no --enable-lora) | - | {base:.1f} | 1.00 | {rounds[0]}, {rounds[1]} |")
    for n in args.adapters:
        case = RESULTS[f"adapters@{n}"]
        ours = case["decode_tok_s"]
        print(
            f"| --enable-lora | {n} | {ours:.1f} | {ours / base:.2f} | "
            f"{case['timed_attempts']}, {case['compiles_in_timed_runs']} |"
        )


if __name__ == "__main__":
    main()
