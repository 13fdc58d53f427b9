"""Every GPU benchmark in one call on the lent machine; the tables print last.

    python3 benchmarks/gpu_suite.py [--smoke | --cpu-dry-run] [--batches 1 32 128]
                                    [--stages ...] [--peers-gpu 1] [--budget-s 585]

Stages, in this order (``--stages`` picks some; each writes its results as it goes, so a run
cut short still reports):

1. copy bandwidth of the GPU (torch device-to-device copy, bytes read + written);
2. ``kernels``: the ragged paged attention decode kernels against it and the Pallas GPU kernel's
   tile sweep at 2k and 8k context, writing the measured table ``$OUT/gpu_tuning_table.py``
   (``attention_sweep.py``), in a child process (with ``--peers-gpu N`` on GPU N, while this
   process writes the checkpoint);
3. a Llama-3-8B-shaped bf16 checkpoint with random weights, written on the device;
4. ``hf`` and ``hf_compiled``: the Hugging Face peers (``hf_peers.py``: ``generate`` eager, and
   with a static cache and compiled, CUDA-graphed decoding; the compiled one first, the one the
   targets compare against), in a child process: on the same
   GPU before the plugin, or with ``--peers-gpu N`` on GPU N after the kernel stage, at the same
   time as the plugin (the x2 machine: the whole suite then fits one call of 8 minutes);
5. ``plugin`` (``vllm.LLM``, TPU_PLUGIN_DEVICE=gpu): decode throughput per batch size with
   512-token prompts and 256 new tokens (greedy, ignore_eos); decode time = full run minus a
   prefill-only run (max_tokens=1), both after a warm-up run that compiles the buckets; then the
   engine's own decode programs profiled in its worker (``step_profile.py``): device time per
   step, and every kernel of a step named and timed (the optimized HLO of the very program
   joined with its profiler trace; the HLO text goes to ``$OUT/step_hlo/``);
6. ``xla_dump``: ``decode_hlo.py`` in a child process, one decode program (``--dump-batches``,
   default the middle batch) compiled with ``XLA_FLAGS=--xla_dump_to=$OUT/xla_dump`` and traced,
   inventory in ``$OUT/decode_hlo/``;
7. the HBM roofline: (weights + KV bytes read per step) / measured copy bandwidth.

``--budget-s``: the call's wall-clock limit; a stage that cannot fit in what is left is
recorded as skipped (the xla dump first: the plugin stage profiles its programs too).
``--smoke`` uses a 2-layer model and small shapes to prove the path in a minute.
``--cpu-dry-run`` is ``--smoke`` on this machine's CPU (JAX CPU, torch CPU, the attention kernel
in interpret mode, HF's compile without CUDA graphs): every stage and table runs, no number
means anything; it is how the suite is checked before a device call (with ``--peers-gpu 1`` the
side chain runs beside the main stages on the same CPU). Results:
``$OUT/gpu_suite.json`` (+ ``attention_sweep.json``, ``hf_peers.json`` of the children).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("TPU_PLUGIN_DEVICE", "gpu")
# The step profile is a function sent to the engine's worker (LLM.collective_rpc).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT", "/tmp")
RESULTS: dict = {}
# "cuda" on the lent GPU; "cpu" for --cpu-dry-run (set by main before any stage)
DEVICE = "cuda"


def save() -> None:
    with open(os.path.join(OUT, "gpu_suite.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (CPU: a host memcpy)."""
    import torch

    n = 2**30 if DEVICE == "cuda" else 2**24  # 4 GiB of float32 (CPU: 64 MiB)
    x = torch.empty(n, dtype=torch.float32, device=DEVICE)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    if DEVICE != "cuda":
        start = time.perf_counter()
        for _ in range(10):
            y.copy_(x)
        return 2 * 4 * n / ((time.perf_counter() - start) / 10)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    del x, y
    torch.cuda.empty_cache()
    return 2 * 4 * n / seconds


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
    config.architectures = config.architectures or ["LlamaForCausalLM"]
    config.save_pretrained(path)
    with torch.device("meta"):
        shapes = {
            k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
        }
    total, shard, shard_bytes, index = 0, {}, 0, {}
    # bench_lora.py writes its checkpoint on a machine without CUDA too
    device = DEVICE if torch.cuda.is_available() else "cpu"
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


def bench_plugin(
    path: str,
    batches: list[int],
    prompt_len: int,
    new_tokens: int,
    vocab: int,
    *,
    label: str = "plugin",
    profile: bool = True,
    **engine: object,
):
    """Decode tok/s per batch into ``RESULTS[f"{label}@{batch}"]``; ``engine``: more
    ``vllm.LLM`` arguments (``quantization=``, ``kv_cache_dtype=``: bench_quantized.py)."""
    from decode_timing import time_decode
    from vllm import LLM

    start = time.perf_counter()
    # CPU dry run: a fixed KV budget (a fraction of host RAM would be most of it)
    memory = (
        {"gpu_memory_utilization": 0.9}
        if DEVICE == "cuda"
        else {"kv_cache_memory_bytes": 2**27, "max_num_batched_tokens": 512}
    )
    llm = LLM(
        model=path,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=prompt_len + new_tokens + 16,
        max_num_seqs=max(batches),
        **{"max_num_batched_tokens": 8192, **memory},
        enable_prefix_caching=False,  # reruns of the same prompts must recompute
        **engine,
    )
    RESULTS[f"{label}_startup_s"] = time.perf_counter() - start
    save()
    for batch in batches:
        inputs = [{"prompt_token_ids": p} for p in prompts(batch, prompt_len, vocab)]
        RESULTS[f"{label}@{batch}"] = time_decode(llm, inputs, new_tokens)
        outs = RESULTS[f"{label}@{batch}"].pop("outputs")
        RESULTS[f"{label}@{batch}"]["tokens"] = [o.outputs[0].token_ids[:8] for o in outs[:2]]
        print(label, batch, RESULTS[f"{label}@{batch}"], flush=True)
        save()
    if not profile:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        return
    # Same programs, same engine: the device step alone (benchmarks/step_profile.py).
    import cloudpickle
    import step_profile

    cloudpickle.register_pickle_by_value(step_profile)
    context = prompt_len + new_tokens // 2
    try:
        (profile,) = llm.collective_rpc(step_profile.device_step_profile, args=(batches, context))
        RESULTS["step_profile"] = profile
        for batch in batches:
            hlo_dir = os.path.join(OUT, "step_hlo")
            (ops,) = llm.collective_rpc(
                step_profile.op_profile, args=(batch, context, 10, 15, hlo_dir)
            )
            RESULTS[f"op_profile@{batch}"] = ops
            shown = {k: v for k, v in ops.items() if k != "named"}
            print("op profile", batch, json.dumps(shown, indent=1), flush=True)
    except Exception as error:  # the throughput numbers stand without it
        RESULTS["step_profile"] = {"error": str(error)[:300]}
    print("step profile", RESULTS["step_profile"], flush=True)
    save()
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


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
        if row is None or f"plugin@{batch}" not in RESULTS:
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
    rows = {k: v for k, v in RESULTS.items() if k.startswith("attn_") and "@" in k}
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
    table = RESULTS.get("attn_table")
    if table:
        print(f"measured tile table: {table['path']} (copy to kernels/ragged_paged_attention/)")


STAGES = ("kernels", "hf", "hf_compiled", "plugin", "xla_dump")


def child(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """A child process of this suite (own CUDA context: its memory is freed when it ends)."""
    return subprocess.Popen([sys.executable, *args], env={**os.environ, **(env or {})})


def wait(proc: subprocess.Popen, deadline: float, name: str) -> None:
    try:
        proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        RESULTS.setdefault("skipped", {})[name] = "cut short by --budget-s"


def read_child(name: str, prefix: tuple[str, ...]) -> None:
    path = os.path.join(OUT, name)
    if os.path.isfile(path):
        with open(path) as f:
            RESULTS.update({k: v for k, v in json.load(f).items() if k.startswith(prefix)})


def hf_only(args: argparse.Namespace, batches: list[int], prompt_len: int, new_tokens: int):
    """The ``--hf-only`` child: both HF peers, results in ``$OUT/hf_peers.json``."""
    import hf_peers

    config = llama_config(args.smoke)
    path = checkpoint_path(args.smoke)
    results: dict = {}

    def save_peers() -> None:
        with open(os.path.join(OUT, "hf_peers.json"), "w") as f:
            json.dump(results, f, indent=1)

    def ids(batch: int) -> list:
        return prompts(batch, prompt_len, config.vocab_size)

    # The compiled peer first: the targets compare against it, and a cut-short run keeps it.
    if "hf_compiled" in args.stages:
        # The static cache's per-step work does not depend on the position (the attention
        # reads the whole cache, masked): fewer timed tokens give the same per-step time.
        hf_peers.bench_hf_compiled(
            path, batches, ids, prompt_len, new_tokens, results, save_peers,
            timed_tokens=min(new_tokens, 64), device=DEVICE,
        )  # fmt: skip
        save_peers()
        gc.collect()
    if "hf" in args.stages:
        hf_peers.bench_hf(path, batches, ids, new_tokens, results, save_peers, device=DEVICE)
        save_peers()


def checkpoint_path(smoke: bool) -> str:
    return "/tmp/llama-smoke" if smoke else "/tmp/llama-3-8b-random"


def print_throughput(config, weight_bytes: int, batches: list[int], context: float, bw: float):
    print(
        "| batch | plugin decode tok/s | % of roofline | HF tok/s | plugin / HF | "
        "HF static+compiled tok/s (% of roofline) | plugin / HF compiled | HF CUDA graphs |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for batch in batches:
        ours = RESULTS.get(f"plugin@{batch}", {}).get("decode_tok_s")
        roof = roofline_tok_s(config, weight_bytes, batch, context, bw)
        hf = RESULTS.get(f"hf@{batch}", {}).get("decode_tok_s")
        peer = RESULTS.get(f"hf_compiled@{batch}", {})
        compiled = peer.get("decode_tok_s")
        cols = [f"{ours:.1f}" if ours else "-", f"{100 * ours / roof:.0f}%" if ours else "-"]
        cols += [f"{hf:.1f}" if hf else "-", f"{ours / hf:.2f}x" if hf and ours else "-"]
        cols += [f"{compiled:.1f} ({100 * compiled / roof:.0f}%)" if compiled else "-"]
        cols += [f"{ours / compiled:.2f}x" if compiled and ours else "-"]
        skips = peer.get("cudagraph_skips")
        graphs = "-" if skips is None else ("used" if not skips else f"skipped ({skips})")
        print(f"| {batch} | " + " | ".join(cols + [graphs]) + " |")
    for batch in batches:
        for message in RESULTS.get(f"hf_compiled@{batch}", {}).get("cudagraph_messages", [])[:3]:
            print(f"  HF compiled, batch {batch}: {message}")


def print_dump_summary() -> None:
    """The ``xla_dump`` stage's kernel inventory (``decode_hlo.py``'s ``summary.md``)."""
    path = os.path.join(OUT, "decode_hlo", "summary.md")
    if "xla_dump" in RESULTS and os.path.isfile(path):
        with open(path) as f:
            print(f"\nXLA dump of one decode program ({RESULTS['xla_dump']['dir']}):\n{f.read()}")


def print_named_kernels(batches: list[int]) -> None:
    """Per batch: device ms per step by kernel role (the engine's program, step_profile)."""
    for batch in batches:
        named = RESULTS.get(f"op_profile@{batch}", {}).get("named")
        if not named:
            continue
        roles = named["ms_per_step_by_role"]
        counts = named["summary"]["roles"]
        print(
            f"\nbatch {batch}: {named['summary']['kernels']} kernels in the program "
            f"({named['summary']['per_layer']} per layer); ms per step by role:"
        )
        print("| role | kernels | ms/step |")
        print("|---|---|---|")
        for role, ms in roles.items():
            print(f"| {role} | {counts.get(role, '-')} | {ms:.3f} |")
        unmatched = sum(named.get("unmatched_ms_per_step", {}).values())
        if unmatched:
            print(f"| (kernels the trace names by their own name) | - | {unmatched:.3f} |")


def side_chain(
    args: argparse.Namespace, kernels: list[str], peers: list[str], ready: threading.Event
) -> threading.Thread:
    """``--peers-gpu N``: the kernel stage, then (once the checkpoint is ``ready``) the HF
    peers, one after the other on GPU N, beside this process's work on GPU 0."""
    env = {"CUDA_VISIBLE_DEVICES": str(args.peers_gpu)}
    deadline = args.deadline

    def run() -> None:
        if kernels:
            wait(child(kernels, env), deadline, "kernels")
        if peers:
            ready.wait(max(1.0, deadline - time.perf_counter()))
            wait(child(peers, env), deadline, "hf")

    thread = threading.Thread(target=run, name="gpu-suite-side", daemon=True)
    thread.start()
    return thread


def xla_dump(args: argparse.Namespace, smoke: list[str]) -> None:
    """The ``xla_dump`` stage (module doc), skipped when too little of ``--budget-s`` is left."""
    left = args.deadline - time.perf_counter()
    if left < (30 if args.smoke else 100):
        RESULTS.setdefault("skipped", {})["xla_dump"] = f"{left:.0f} s left of --budget-s"
        return
    batches = args.dump_batches or [args.batches[len(args.batches) // 2]]
    dump_args = [os.path.join(os.path.dirname(__file__), "decode_hlo.py"), *smoke]
    wait(child([*dump_args, "--batches", *map(str, batches)]), args.deadline, "xla_dump")
    RESULTS["xla_dump"] = {"dir": os.path.join(OUT, "xla_dump"), "batches": batches}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--cpu-dry-run", action="store_true", help="--smoke on CPU (doc)")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--dump-batches", type=int, nargs="+", default=None)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--skip-hf", action="store_true", help="no HF peer (either)")
    parser.add_argument("--skip-kernels", action="store_true", help="no attention stage")
    parser.add_argument("--peers-gpu", type=int, default=None, help="run the HF peers there")
    parser.add_argument("--budget-s", type=float, default=585.0)
    parser.add_argument("--kernels-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_dry_run:
        global DEVICE
        DEVICE, args.smoke = "cpu", True
        os.environ["TPU_PLUGIN_DEVICE"] = "cpu"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("TPU_PLUGIN_PRECOMPILE", "0")  # start-up compiles are not tested
    if args.peers_gpu is not None:
        # This process and its other children (the engine, the XLA dump) see only their GPU:
        # JAX would otherwise preallocate most of the peers' GPU too (set before CUDA starts).
        os.environ["CUDA_VISIBLE_DEVICES"] = "1" if args.peers_gpu == 0 else "0"
    if args.skip_hf:
        args.stages = [s for s in args.stages if s not in ("hf", "hf_compiled")]
    if args.skip_kernels:
        args.stages = [s for s in args.stages if s != "kernels"]
    args.batches = args.batches or ([1, 4] if args.smoke else [1, 32, 128])
    return args


def main() -> None:
    args = parse_args()
    batches = args.batches
    prompt_len, new_tokens = (64, 32) if args.smoke else (512, 256)
    start = time.perf_counter()
    args.deadline = start + args.budget_s

    if args.hf_only:
        hf_only(args, batches, prompt_len, new_tokens)
        return
    bw = copy_bandwidth()
    RESULTS["copy_bw_bytes_s"] = bw
    if args.kernels_only:
        import attention_sweep

        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        results: dict = {"copy_bw_bytes_s": bw}
        attention_sweep.sweep([512] if args.smoke else [2048, 8192], bw, results, smoke=args.smoke)
        with open(os.path.join(OUT, "attention_sweep.json"), "w") as f:
            json.dump(results, f, indent=1)
        RESULTS.update(results)
        print_kernel_table()
        return
    smoke = ["--cpu-dry-run"] if args.cpu_dry_run else ["--smoke"] if args.smoke else []
    kernels = [__file__, "--kernels-only", *smoke] if "kernels" in args.stages else []
    peers = [s for s in args.stages if s in ("hf", "hf_compiled")]
    batch_args = ["--batches", *map(str, batches)]
    peer_args = [__file__, "--hf-only", *smoke, *batch_args, "--stages", *peers] if peers else []
    ready, side = threading.Event(), None
    if args.peers_gpu is not None:  # kernels, then the peers, on another GPU (side_chain)
        side = side_chain(args, kernels, peer_args, ready)
        RESULTS["peers_gpu"] = args.peers_gpu
    elif kernels:
        wait(child(kernels), args.deadline, "kernels")
        read_child("attention_sweep.json", ("attn_",))
    config = llama_config(args.smoke)
    path = checkpoint_path(args.smoke)
    t0 = time.perf_counter()
    weight_bytes = write_checkpoint(path, config)
    RESULTS.update(weight_bytes=weight_bytes, checkpoint_s=time.perf_counter() - t0)
    ready.set()
    save()
    if peer_args and side is None:  # before the plugin (its start-up is the long stage)
        plugin_reserve = 0 if "plugin" not in args.stages else 60 if args.smoke else 330
        wait(child(peer_args), args.deadline - plugin_reserve, "hf")
        read_child("hf_peers.json", ("hf",))
    if "plugin" in args.stages:
        bench_plugin(path, batches, prompt_len, new_tokens, config.vocab_size)
    save()
    if "xla_dump" in args.stages:
        xla_dump(args, ["--smoke"] if args.smoke else [])
    if side is not None:
        side.join(max(1.0, args.deadline - time.perf_counter()) + 5)
        read_child("attention_sweep.json", ("attn_",))
        read_child("hf_peers.json", ("hf",))

    context = prompt_len + new_tokens / 2
    started = RESULTS.get("plugin_startup_s")
    print(
        f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; weights {weight_bytes / 1e9:.2f} GB "
        f"({weight_bytes_per_step(config, weight_bytes) / 1e9:.2f} GB read per step); "
        f"plugin start-up {started or 0:.0f} s; prompts {prompt_len}, {new_tokens} new tokens; "
        f"suite {time.perf_counter() - start:.0f} s"
    )
    print_dump_summary()
    print_named_kernels(batches)
    print_kernel_table()
    print_step_profile(config, weight_bytes, batches, context, bw)
    print_throughput(config, weight_bytes, batches, context, bw)
    if RESULTS.get("skipped"):
        print("skipped:", RESULTS["skipped"])
    save()


if __name__ == "__main__":
    main()
