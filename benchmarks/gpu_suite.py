"""Every GPU benchmark in one call on the lent machine; the table prints last.

    python3 benchmarks/gpu_suite.py [--smoke] [--batches 1 32 128] [--skip-hf]

1. copy bandwidth of the GPU (torch device-to-device copy, bytes read + written), then the
   ragged paged attention decode kernels (reference and Pallas GPU) against it, in a child
   process;
2. a Llama-3-8B-shaped bf16 checkpoint with random weights, written on the device;
3. the plugin (``vllm.LLM``, TPU_PLUGIN_DEVICE=gpu): decode throughput per batch size with
   512-token prompts and 256 new tokens (greedy, ignore_eos); decode time = full run minus a
   prefill-only run (max_tokens=1), both after a warm-up run that compiles the buckets;
4. HF transformers ``generate`` on the same GPU, same prompts, timed the same way;
5. the HBM roofline: (weights + KV bytes read per step) / measured copy bandwidth.

``--smoke`` uses a 2-layer model and small shapes to prove the path in a minute. Partial
results are written to $OUT/gpu_suite.json after each stage, so a run cut short still reports.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TPU_PLUGIN_DEVICE", "gpu")
# The step profile is a function sent to the engine's worker (LLM.collective_rpc).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT", "/tmp")
RESULTS: dict = {}


def save() -> None:
    with open(os.path.join(OUT, "gpu_suite.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def copy_bandwidth() -> float:
    import torch

    x = torch.empty(2**30, dtype=torch.float32, device="cuda")  # 4 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    del x, y
    torch.cuda.empty_cache()
    return 2 * 4 * 2**30 / seconds


def bench_attention_kernels(
    contexts: list[int], bw: float, batch: int = 64, sweep: list[tuple] | None = None
) -> None:
    """Ragged paged attention decode (GQA 32/8, head 128, bf16, page 16): achieved KV bytes/s.

    Times the reference once and the Pallas GPU kernel for every config of ``sweep`` (default
    below); per context it records each config's fraction of the copy bandwidth and
    relative error against the reference, and the best config (``attn_best@<context>``). The
    kernel's defaults are also stored as ``attn_pallas-gpu@<context>``. A config that fails to
    build or run is recorded with its error and the sweep goes on.

    Runs in a subprocess-free way before the engine starts; JAX's preallocation is turned off
    for this process so the engine (a separate process) still gets its memory.
    """
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from tpu_kernels.ragged_paged_attention import reference

    # (num_kv_splits, num_kv_pages_per_block, num_warps, num_stages, block_q); None = the
    # kernel's default (here: 8 splits, 4 pages = 64 keys, block_q 4 = 16-row tiles). The
    # first row is the kernel's defaults. 12 configs, ~1 s of compile each per context.
    sweep = sweep or [
        (None, None, 4, 2, None),
        (1, 4, 4, 2, 16),  # the kernel before split-KV: 64-row tiles, one split
        (4, 4, 4, 2, 16),  # split-KV on 64-row tiles
        (1, 4, 4, 2, None),  # 16-row tiles, one split
        (2, 4, 4, 2, None),
        (4, 4, 4, 2, None),
        (16, 4, 4, 2, None),
        (8, 2, 4, 2, None),
        (8, 8, 4, 2, None),
        (8, 4, 4, 3, None),
        (8, 4, 8, 2, None),
        (8, 4, 2, 2, None),
    ]
    impls = {"reference": reference.ragged_paged_attention}
    try:
        from tpu_kernels.ragged_paged_attention import gpu

        for i, (splits, pages, warps, stages, block_q) in enumerate(sweep):
            name = (
                "pallas-gpu"
                if i == 0
                else f"pallas-gpu splits={splits or 'auto'} pages={pages or 'auto'} "
                f"warps={warps} stages={stages} block_q={block_q or 'auto'}"
            )
            impls[name] = functools.partial(
                gpu.ragged_paged_attention,
                num_kv_splits=splits,
                num_kv_pages_per_block=pages,
                num_warps=warps,
                num_stages=stages,
                block_q=block_q,
            )
    except ImportError:
        pass
    q_heads, kv_heads, dim, page = 32, 8, 128, 16
    for context in contexts:
        pages_per_seq = context // page
        num_pages = batch * pages_per_seq
        key = jax.random.key(context)
        kq, kk, kv = jax.random.split(key, 3)
        q = jax.random.normal(kq, (batch, q_heads, dim), jnp.bfloat16)
        k = jax.random.normal(kk, (num_pages, page, kv_heads, dim), jnp.bfloat16)
        v = jax.random.normal(kv, (num_pages, page, kv_heads, dim), jnp.bfloat16)
        table = jnp.asarray(np.random.default_rng(0).permutation(num_pages).reshape(batch, -1))
        kv_lens = jnp.full((batch,), context, jnp.int32)
        starts = jnp.arange(batch + 1, dtype=jnp.int32)
        num_seqs = jnp.array([batch], jnp.int32)
        kv_bytes = 2 * batch * context * kv_heads * dim * 2
        ref = None
        stage_start = time.perf_counter()
        for name, fn in impls.items():
            layout = (kv_lens, table, starts, num_seqs)
            call = jax.jit(lambda q, k, v, layout, fn=fn: fn(q, k, v, *layout, sm_scale=dim**-0.5))
            try:
                out = np.asarray(call(q, k, v, layout).block_until_ready(), np.float32)
                call(q, k, v, layout).block_until_ready()
                start = time.perf_counter()
                for _ in range(50):
                    result = call(q, k, v, layout)
                result.block_until_ready()
                seconds = (time.perf_counter() - start) / 50
            except Exception as error:  # a kernel that fails to build is reported, not fatal
                RESULTS[f"attn_{name}@{context}"] = {"error": str(error)[:300]}
                continue
            row = {
                "ms": seconds * 1e3,
                "kv_bytes_s": kv_bytes / seconds,
                "fraction_of_copy_bw": kv_bytes / seconds / bw,
            }
            if name == "reference":
                ref = out
            elif ref is not None:
                row["rel_err"] = float(np.abs(out - ref).max() / np.abs(ref).max())
            RESULTS[f"attn_{name}@{context}"] = row
            print("attention", context, name, row, flush=True)
        timed = {
            name: RESULTS[f"attn_{name}@{context}"]
            for name in impls
            if name != "reference" and "ms" in RESULTS[f"attn_{name}@{context}"]
        }
        if timed:
            best = min(timed, key=lambda name: timed[name]["ms"])
            RESULTS[f"attn_best@{context}"] = {"config": best, **timed[best]}
        RESULTS[f"attn_stage@{context}"] = {"seconds": time.perf_counter() - stage_start}
        save()
        del q, k, v


def llama_config(smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(
            vocab_size=32000,
            hidden_size=512,
            intermediate_size=1024,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )


def write_checkpoint(path: str, config) -> int:
    """Random bf16 weights (std 0.02, norms at 1) in HF names; returns the weight bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    os.makedirs(path, exist_ok=True)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    with torch.device("meta"):
        shapes = {
            k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
        }
    total, shard, shard_bytes, index = 0, {}, 0, {}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # bench_lora.py's CPU figure
    gen = torch.Generator(device=device).manual_seed(0)

    def flush(n: int) -> None:
        name = f"model-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, name))
        index.update({k: name for k in shard})

    n = 0
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (
                torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
            ).cpu()
        shard[key] = t
        shard_bytes += t.numel() * 2
        total += t.numel() * 2
        if shard_bytes > 4 * 2**30:
            flush(n)
            n, shard, shard_bytes = n + 1, {}, 0
    if shard:
        flush(n)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    return total


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(batch)
    return [rng.integers(10, vocab - 10, length).tolist() for _ in range(batch)]


def bench_plugin(path: str, batches: list[int], prompt_len: int, new_tokens: int, vocab: int):
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=path,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=prompt_len + new_tokens + 16,
        max_num_seqs=max(batches),
        max_num_batched_tokens=8192,
        gpu_memory_utilization=0.9,
        enable_prefix_caching=False,
    )  # reruns of the same prompts must recompute
    RESULTS["plugin_startup_s"] = time.perf_counter() - start
    save()
    for batch in batches:
        inputs = [{"prompt_token_ids": p} for p in prompts(batch, prompt_len, vocab)]
        full = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(inputs, full, use_tqdm=False)  # compiles this batch's buckets
        llm.generate(inputs, first, use_tqdm=False)
        t1 = time.perf_counter()
        # Best of two prefill-only runs: a stray compile of a new chunk mix must not count.
        prefill_runs = []
        for _ in range(2):
            start = time.perf_counter()
            llm.generate(inputs, first, use_tqdm=False)
            prefill_runs.append(time.perf_counter() - start)
        prefill_s = min(prefill_runs)
        t2 = time.perf_counter()
        outs = llm.generate(inputs, full, use_tqdm=False)
        t3 = time.perf_counter()
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
        decode_s = (t3 - t2) - prefill_s
        RESULTS[f"plugin@{batch}"] = {
            "warmup_s": t1 - t0,
            "prefill_s": prefill_s,
            "full_s": t3 - t2,
            "decode_tok_s": batch * (new_tokens - 1) / decode_s,
            "tokens": [o.outputs[0].token_ids[:8] for o in outs[:2]],
        }
        print("plugin", batch, RESULTS[f"plugin@{batch}"], flush=True)
        save()
    # Same programs, same engine: the device step alone (benchmarks/step_profile.py).
    import cloudpickle
    import step_profile

    cloudpickle.register_pickle_by_value(step_profile)
    context = prompt_len + new_tokens // 2
    try:
        (profile,) = llm.collective_rpc(step_profile.device_step_profile, args=(batches, context))
        RESULTS["step_profile"] = profile
        for batch in batches:
            (ops,) = llm.collective_rpc(step_profile.op_profile, args=(batch, context))
            RESULTS[f"op_profile@{batch}"] = ops
            print("op profile", batch, json.dumps(ops, indent=1), flush=True)
    except Exception as error:  # the throughput numbers stand without it
        RESULTS["step_profile"] = {"error": str(error)[:300]}
    print("step profile", RESULTS["step_profile"], flush=True)
    save()
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def bench_hf(path: str, batches: list[int], prompt_len: int, new_tokens: int, vocab: int):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    model.generation_config.eos_token_id = None
    for batch in batches:
        ids = torch.tensor(prompts(batch, prompt_len, vocab), device="cuda")
        mask = torch.ones_like(ids)

        def run(n: int, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> float:
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
            torch.cuda.synchronize()
            return time.perf_counter() - start

        run(2)
        prefill_s, full_s = run(1), run(new_tokens)
        RESULTS[f"hf@{batch}"] = {
            "prefill_s": prefill_s,
            "full_s": full_s,
            "decode_tok_s": batch * (new_tokens - 1) / (full_s - prefill_s),
        }
        print("hf", batch, RESULTS[f"hf@{batch}"], flush=True)
        save()


def weight_bytes_per_step(config, weight_bytes: int) -> int:
    """Weight bytes a decode step reads: all but the input embedding table (a step gathers
    one row of it per token; with tied embeddings the table is the lm_head and is read)."""
    if getattr(config, "tie_word_embeddings", False):
        return weight_bytes
    return weight_bytes - config.vocab_size * config.hidden_size * 2


def roofline_tok_s(config, weight_bytes: int, batch: int, context: float, bw: float) -> float:
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    step_bytes = weight_bytes_per_step(config, weight_bytes) + batch * context * kv_bytes
    return batch / (step_bytes / bw)


def print_step_profile(config, weight_bytes: int, batches: list[int], context: float, bw: float):
    """Engine step vs the device program alone vs the roofline, in ms per decode step."""
    profile = RESULTS.get("step_profile") or {}
    if "error" in profile or not profile:
        print(f"\nstep profile: {profile.get('error', 'not run')}")
        return
    print(
        "\n| batch | engine ms/step | forward+sample ms | forward ms | dispatch ms | "
        "roofline ms | XLA bytes / roofline bytes |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch in batches:
        row = profile.get(str(batch))
        if row is None:
            continue
        engine_ms = 1e3 * batch / RESULTS[f"plugin@{batch}"]["decode_tok_s"]
        roof_tok_s = roofline_tok_s(config, weight_bytes, batch, context, bw)
        roof_ms = 1e3 * batch / roof_tok_s
        roof_bytes = roof_ms / 1e3 * bw
        xla = row.get("bytes_accessed")
        ratio = f"{xla / roof_bytes:.2f}" if xla else "-"
        print(
            f"| {batch} | {engine_ms:.2f} | {row['forward_sample_ms']:.2f} | "
            f"{row['forward_ms']:.2f} | {row['dispatch_ms']:.2f} | {roof_ms:.2f} | {ratio} |"
        )


def print_kernel_table() -> None:
    rows = {k: v for k, v in RESULTS.items() if k.startswith("attn_")}
    if not rows:
        return
    print("\n| attention kernel | context | ms | KV GB/s | of copy bandwidth | rel err |")
    print("|---|---|---|---|---|---|")
    for key, row in rows.items():
        name, context = key[5:].split("@")
        if name in ("best", "stage"):
            continue
        if "ms" not in row:
            print(f"| {name} | {context} | failed: {row.get('error', '?')[:120]} |")
            continue
        err = row.get("rel_err")
        print(
            f"| {name} | {context} | {row['ms']:.3f} | {row['kv_bytes_s'] / 1e9:.0f} | "
            f"{100 * row['fraction_of_copy_bw']:.0f}% | {'-' if err is None else f'{err:.1e}'} |"
        )
    for key, row in rows.items():
        name, context = key[5:].split("@")
        if name == "best":
            print(
                f"best at {context}: {row['config']} ({100 * row['fraction_of_copy_bw']:.0f}% of "
                f"copy bandwidth, {row['ms']:.3f} ms)"
            )
        elif name == "stage":
            print(f"kernel stage at {context}: {row['seconds']:.0f} s (compiles included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--kernels-only", action="store_true", help="only the attention stage")
    parser.add_argument("--skip-kernels", action="store_true", help="no attention stage")
    args = parser.parse_args()
    batches = args.batches or ([1, 4] if args.smoke else [1, 32, 128])
    prompt_len, new_tokens = (64, 32) if args.smoke else (512, 256)

    bw = copy_bandwidth()
    RESULTS["copy_bw_bytes_s"] = bw
    if args.kernels_only:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        bench_attention_kernels([512] if args.smoke else [2048, 8192], bw)
        print_kernel_table()
        return
    if not args.skip_kernels:
        # Own process: JAX in this one would hold GPU memory the engine needs.
        subprocess.run(
            [sys.executable, __file__, "--kernels-only"] + (["--smoke"] if args.smoke else []),
            check=False,
        )
        with open(os.path.join(OUT, "gpu_suite.json")) as f:
            RESULTS.update({k: v for k, v in json.load(f).items() if k.startswith("attn_")})
    config = llama_config(args.smoke)
    path = "/tmp/llama-smoke" if args.smoke else "/tmp/llama-3-8b-random"
    start = time.perf_counter()
    weight_bytes = write_checkpoint(path, config)
    RESULTS.update(weight_bytes=weight_bytes, checkpoint_s=time.perf_counter() - start)
    save()
    # HF first: the plugin's start-up is the long stage, and a run cut short must still hold
    # the same-run reference.
    if not args.skip_hf:
        bench_hf(path, batches, prompt_len, new_tokens, config.vocab_size)
        gc.collect()
        import torch

        torch.cuda.empty_cache()
    bench_plugin(path, batches, prompt_len, new_tokens, config.vocab_size)

    context = prompt_len + new_tokens / 2
    print(
        f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; weights {weight_bytes / 1e9:.2f} GB "
        f"({weight_bytes_per_step(config, weight_bytes) / 1e9:.2f} GB read per step); "
        f"plugin start-up {RESULTS['plugin_startup_s']:.0f} s; prompts {prompt_len}, "
        f"{new_tokens} new tokens"
    )
    print("| batch | plugin decode tok/s | % of roofline | HF decode tok/s | plugin / HF |")
    print("|---|---|---|---|---|")
    for batch in batches:
        ours = RESULTS[f"plugin@{batch}"]["decode_tok_s"]
        roof = roofline_tok_s(config, weight_bytes, batch, context, bw)
        hf = RESULTS.get(f"hf@{batch}", {}).get("decode_tok_s")
        hf_cols = f"{hf:.1f} | {ours / hf:.2f}x" if hf else "- | -"
        print(f"| {batch} | {ours:.1f} | {100 * ours / roof:.0f}% | {hf_cols} |")
    print_step_profile(config, weight_bytes, batches, context, bw)
    print_kernel_table()
    save()


if __name__ == "__main__":
    main()
