"""MoE experts in host memory on the lent GPU, in one call; the tables print last.

    python3 benchmarks/bench_moe_offload.py [--smoke] [--layers 12] [--cap-gib 8] [--only S]

1. A Qwen3-30B-A3B-shaped bf16 checkpoint (128 experts, top-8, hidden 2048, expert width 768,
   32 query / 4 KV heads; ``--layers`` decoder layers, 48 in the real model) with random
   weights, written from the device (``gpu_suite.write_checkpoint``).
2. Direct steps (``tpu_plugin/tools/offload_steps.py``, the step the offload tests prove equal
   to the resident model's) in a child process: resident, ``lru`` and ``predict`` with the
   device cache at a quarter of the experts, batch 1 and 8, and the router replaced by a
   declared per-request Zipf affinity (``tpu_plugin/tools/skewed_routing.py``) at several
   skews (0 = uniform, what random weights do). ``predict-c4``: predict with its demand copies
   issued 4 a loop iteration (``TPU_PLUGIN_MOE_OFFLOAD_COPY_CHUNK``; ``--copy-chunks``).
   Per case: decode ms/step, hit rate, bytes
   host-to-device per token, the stall (offload step - resident step) against the demand
   misses' bytes / the measured host-to-device bandwidth (the offload's own in-program copy,
   ``expert_cache.measure_fetch_bandwidth``).
3. ``vllm.LLM`` (the engine ``vllm serve`` runs) in child processes: fully resident with the
   whole GPU, and offloaded (``--additional-config moe_offload``) with the device memory the
   engine may use capped below the model's size by ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (the
   model's own random router: near-uniform routing). Decode tok/s at batch 1 and 8 (full run
   minus a prefill-only run, after a warm-up), the worker's counters, and the host-link
   roofline: batch x bandwidth / bytes copied per decode step.

Results go to ``$OUT/moe_offload.json`` after each stage, so a run cut short still reports.
``--smoke`` (2 layers, 32 experts) proves the path in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT", "/tmp")
# Kept outside $OUT (a fresh folder per device call) so --only calls add to one file; each save
# also copies it into $OUT.
RESULTS_PATH = "/tmp/bench_moe_offload.json"
SKEWS = (0.0, 0.8, 1.2)  # Zipf exponents of the per-request affinity; 1.2: see NOTES
BATCHES = (1, 8)
POLICIES = ("predict", "lru")
CACHE = "0.25"  # a quarter of the experts on the device (TPU_PLUGIN_MOE_OFFLOAD_CACHE form)
PREFETCH = 4


def qwen3_moe_config(layers: int, smoke: bool):
    from transformers import Qwen3MoeConfig

    experts = 32 if smoke else 128
    return Qwen3MoeConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=experts,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=4096,
        rope_theta=1e6,
        tie_word_embeddings=False,
        architectures=["Qwen3MoeForCausalLM"],
    )


def load_results() -> dict:
    if os.path.exists(RESULTS_PATH):
        with open(RESULTS_PATH) as f:
            return json.load(f)
    return {}


def save(update: dict) -> None:
    results = load_results() | update
    for where in (RESULTS_PATH, os.path.join(OUT, "moe_offload.json")):
        with open(where, "w") as f:
            json.dump(results, f, indent=1)


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed + batch)
    return [rng.integers(10, vocab - 10, length).tolist() for _ in range(batch)]


# ---- stage 2: direct steps, declared skew ------------------------------------------------------
def profile_steps(stepper, ids, affinity, name: str) -> None:
    """A profiler trace of 6 warm steps under ``$OUT/trace_<name>``, summarised: device time
    per step against wall time per step (the gap is the device waiting on the host) and the
    instructions that take the most device time."""
    import collections
    import glob
    import shutil

    import jax

    from tpu_plugin.tools.hlo_trace import trace_events

    folder = os.path.join(OUT, f"trace_{name}")
    steps = 6
    with jax.profiler.trace(folder):
        result = stepper.run(ids, steps, affinity)
    wall = 1e3 * sum(result.decode_s) / len(result.decode_s)
    trace = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0]
    shutil.copy(trace, os.path.join(OUT, f"xplane_{name}.pb"))  # the tool fetches flat files
    events = trace_events(trace)
    per_name: dict[str, float] = collections.Counter()
    calls: dict[str, int] = collections.Counter()
    for op, ns in events:
        per_name[op] += ns
        calls[op] += 1
    busy = sum(per_name.values()) / 1e6 / steps  # the prefill counts too: an upper bound
    print(
        f"profile {name}: wall {wall:.2f} ms/decode step; device busy {busy:.2f} ms/step "
        f"(all {steps} steps, prefill included); {len(events) // steps} kernels/step"
    )
    for op, ns in sorted(per_name.items(), key=lambda item: -item[1])[:15]:
        print(f"  {ns / 1e6 / steps:8.3f} ms/step  {calls[op] / steps:6.1f}x  {op[:90]}")
    save({f"profile/{name}": {"wall_ms": wall, "busy_ms": busy}})


def stage_steps(path: str, prompt_len: int, steps: int, chunks: list[int], profile: bool) -> None:
    import gc

    import jax
    import jax.numpy as jnp
    from transformers import AutoConfig

    from tpu_plugin.tools.offload_steps import load
    from tpu_plugin.tools.skewed_routing import expected_distinct, zipf_affinity

    cfg = AutoConfig.from_pretrained(path)  # its attribute map: num_experts in every version
    layers, experts, top_k = cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok
    rows = max(BATCHES)
    distinct = {str(s): expected_distinct(s, experts, top_k, steps) for s in SKEWS}
    save({"distinct_per_layer": distinct})
    pages = -(-(prompt_len + steps) // 16) + 1  # 16-token pages for prompt + decode
    stepper = None
    # predict-c4: predict with its demand copies issued 4 a loop iteration (COPY_CHUNK)
    variants = [f"predict-c{c}" for c in chunks if c > 1]
    batches, skews = ((1,), (0.8,)) if profile else (BATCHES, SKEWS)
    for mode in ("resident", *POLICIES, *variants):
        start = time.perf_counter()
        if mode == "resident":
            stepper = load(path, rows, None, dtype=jnp.bfloat16, pages_per_seq=pages)
        elif mode == POLICIES[0]:  # the host experts load once; the policies share them
            offload = (mode, ("fraction", float(CACHE)), PREFETCH)
            stepper = load(path, rows, offload, dtype=jnp.bfloat16, pages_per_seq=pages)
        else:
            stepper.offload.cache = None  # the last policy's device cache goes first
            policy, _, chunk = mode.partition("-c")
            stepper = stepper.with_policy(policy, copy_chunk=int(chunk or 1))
        out = {f"steps_load_s/{mode}": time.perf_counter() - start}
        if stepper.offload is not None:
            out["h2d_bytes_s"] = stepper.offload.bandwidth
            out["expert_bytes"] = stepper.offload.expert_bytes
        print(mode, "loaded", out, flush=True)
        save(out)
        for batch in batches:
            ids = prompts(batch, prompt_len, cfg.vocab_size)
            for skew in skews:
                affinity = jnp.asarray(zipf_affinity(batch, batch, layers, experts, skew))
                result = stepper.run(ids, steps, affinity)
                timed = result.decode_s[1:]  # the first decode step compiles
                row = {"ms_per_step": 1e3 * statistics.median(timed), "steps": len(timed)}
                if result.steady is not None:
                    row |= result.steady
                out[f"steps/{mode}/{batch}/{skew}"] = row
                print(mode, batch, skew, row, flush=True)
                save(out)  # a run cut short keeps every finished row
                if profile:
                    profile_steps(stepper, ids, affinity, f"{mode}_b{batch}_s{skew}")
        if mode == "resident":
            stepper = None
            gc.collect()
            jax.clear_caches()


# ---- stage 3: vllm.LLM, resident vs capped device memory ----------------------------------------
def stage_engine(path: str, mode: str, prompt_len: int, new_tokens: int) -> None:
    from vllm import LLM, SamplingParams

    from tpu_plugin.runner.expert_cache import worker_counters

    kwargs = {}
    if mode != "resident":
        kwargs["additional_config"] = {
            "moe_offload": {"policy": mode, "cache": CACHE, "prefetch": PREFETCH}
        }
    start = time.perf_counter()
    llm = LLM(
        model=path,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=prompt_len + new_tokens + 16,
        max_num_seqs=max(BATCHES),
        max_num_batched_tokens=max(BATCHES) * prompt_len,
        gpu_memory_utilization=0.9,
        enable_prefix_caching=False,
        **kwargs,
    )
    out: dict = {f"engine_startup_s/{mode}": time.perf_counter() - start}
    with open(os.path.join(path, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    for batch in BATCHES:
        inputs = [{"prompt_token_ids": p} for p in prompts(batch, prompt_len, vocab)]
        full = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        llm.generate(inputs, full, use_tqdm=False)  # compiles this batch's programs
        offloaded = mode != "resident"
        marks = [llm.collective_rpc(worker_counters)[0]] if offloaded else []
        prefill_s = timed(llm, inputs, first)
        marks += [llm.collective_rpc(worker_counters)[0]] if offloaded else []
        prefill_s = min(prefill_s, timed(llm, inputs, first))
        marks += [llm.collective_rpc(worker_counters)[0]] if offloaded else []
        full_s = timed(llm, inputs, full)
        marks += [llm.collective_rpc(worker_counters)[0]] if offloaded else []
        row = {"prefill_s": prefill_s, "full_s": full_s}
        row["decode_tok_s"] = batch * (new_tokens - 1) / max(full_s - prefill_s, 1e-9)
        if offloaded:  # decode only: the full run's counts minus a prefill-only run's
            keys = ("tokens", "needed", "hits", "copies")
            d = {k: (marks[3][k] - marks[2][k]) - (marks[1][k] - marks[0][k]) for k in keys}
            row["hit_rate"] = d["hits"] / max(d["needed"], 1)
            row["h2d_bytes_per_token"] = (
                d["copies"] * marks[3]["expert_bytes"] / max(d["tokens"], 1)
            )
            row["h2d_bytes_s"] = marks[3]["bandwidth"]
        out[f"engine/{mode}/{batch}"] = row
        print(mode, batch, row, flush=True)
        save(out)
    llm.llm_engine.engine_core.shutdown()


def timed(llm, inputs, params) -> float:
    start = time.perf_counter()
    llm.generate(inputs, params, use_tqdm=False)
    return time.perf_counter() - start


# ---- the tables ---------------------------------------------------------------------------------
def print_tables(r: dict, model_bytes: int, cap: int) -> None:
    bw = r.get("h2d_bytes_s", 0.0)
    eb = r.get("expert_bytes", 0)
    print(
        f"\nhost-to-device {bw / 1e9:.1f} GB/s (pinned_host, in-program copy); expert "
        f"{eb / 2**20:.1f} MiB; model {model_bytes / 2**30:.1f} GiB; device cache {CACHE} of "
        f"the experts; prefetch {PREFETCH}/step; distinct experts a request routes to per layer "
        f"over the run's tokens, by skew: {r.get('distinct_per_layer')}; the resident model "
        f"needs more than the {r.get('cap', 0) / 2**30:.1f} GiB the offloaded engines may use"
    )
    print("\nDirect steps, declared Zipf skew (decode, median ms/step):")
    print(
        "| policy | batch | skew | ms/step | resident ms/step | tok/s | x lru | hit rate | "
        "MB h2d/token | stall ms/token | demand bytes/bw ms/token | stall / that |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    variants = sorted({k.split("/")[1] for k in r if k.startswith("steps/predict-c")})
    for policy in (*POLICIES, *variants):
        for batch in BATCHES:
            for skew in SKEWS:
                row = r.get(f"steps/{policy}/{batch}/{skew}")
                base = r.get(f"steps/resident/{batch}/{skew}")
                lru = r.get(f"steps/lru/{batch}/{skew}")
                if not row or not base:
                    continue
                tok_s = 1e3 * batch / row["ms_per_step"]
                vs_lru = lru["ms_per_step"] / row["ms_per_step"] if lru else float("nan")
                stall = (row["ms_per_step"] - base["ms_per_step"]) / batch
                demand = 1e3 * row["demand_stall_s"] / max(row["tokens"], 1)
                ratio = stall / demand if demand else float("nan")
                print(
                    f"| {policy} | {batch} | {skew} | {row['ms_per_step']:.2f} | "
                    f"{base['ms_per_step']:.2f} | {tok_s:.1f} | {vs_lru:.2f}x | "
                    f"{100 * row['hit_rate']:.1f}% | {row['h2d_bytes_per_token'] / 1e6:.1f} | "
                    f"{stall:.3f} | {demand:.3f} | {ratio:.2f} |"
                )
    print(
        f"\nvllm.LLM, random router (near-uniform), device memory capped at {cap / 2**30:.1f} GiB"
        f" (XLA_PYTHON_CLIENT_MEM_FRACTION) for the offloaded engines, the whole GPU resident:"
    )
    print(
        "| engine | batch | decode tok/s | x resident | hit rate | MB h2d/token | "
        "link roofline tok/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode in ("resident", *POLICIES):
        for batch in BATCHES:
            row = r.get(f"engine/{mode}/{batch}")
            if not row:
                err = r.get(f"engine_error/{mode}")
                if err:
                    print(f"| {mode} | {batch} | failed: {err[:80]} | | | | |")
                continue
            base = r.get(f"engine/resident/{batch}", {}).get("decode_tok_s")
            rel = f"{row['decode_tok_s'] / base:.2f}x" if base else "-"
            if mode == "resident":
                print(
                    f"| resident (whole GPU) | {batch} | {row['decode_tok_s']:.1f} | 1.00x "
                    "| - | - | - |"
                )
                continue
            per_token = row["h2d_bytes_per_token"]
            roof = row["h2d_bytes_s"] / per_token if per_token else float("inf")
            print(
                f"| {mode}, cap {cap / 2**30:.0f} GiB | {batch} | {row['decode_tok_s']:.1f} "
                f"| {rel} | "
                f"{100 * row['hit_rate']:.1f}% | {per_token / 1e6:.1f} | {roof:.1f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 12)")
    parser.add_argument(
        "--cap-gib", type=float, default=None, help="offloaded engines' device memory"
    )
    parser.add_argument(
        "--only",
        choices=("steps", "engine"),
        help="one stage (a call under a time limit); reuses the checkpoint and the results file",
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=("resident", *POLICIES),
        default=["resident", *POLICIES],
        help="the engine stage's engines (the direct steps compare the policies already)",
    )
    parser.add_argument(
        "--copy-chunks",
        type=int,
        nargs="+",
        default=[1, 4],
        help="direct steps: predict again with demand copies this many a loop iteration",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="direct steps at batch 1, skew 0.8 only, each mode profiled (trace under $OUT)",
    )
    parser.add_argument("--stage", choices=("steps", "engine"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    prompt_len, new_tokens, steps = (32, 16, 8) if args.smoke else (128, 64, 24)
    os.environ.setdefault("TPU_PLUGIN_DEVICE", "gpu")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(function)
    os.environ.setdefault("TPU_PLUGIN_PRECOMPILE", "0")  # the warm-up run compiles instead
    if args.stage == "steps":
        return stage_steps(args.path, prompt_len, steps, args.copy_chunks, args.profile)
    if args.stage == "engine":
        return stage_engine(args.path, args.mode, prompt_len, new_tokens)

    import torch
    from gpu_suite import write_checkpoint

    layers = args.layers or (2 if args.smoke else 12)
    cap = int((args.cap_gib or (2 if args.smoke else 8)) * 2**30)
    path = f"/tmp/qwen3-moe-{'smoke' if args.smoke else layers}-random"
    if os.path.exists(RESULTS_PATH) and not args.only:
        os.remove(RESULTS_PATH)
    start = time.perf_counter()
    index = os.path.join(path, "model.safetensors.index.json")
    if args.only and os.path.exists(index):  # written by an earlier call on this machine
        with open(index) as f:
            model_bytes = json.load(f)["metadata"]["total_size"]
    else:
        model_bytes = write_checkpoint(path, qwen3_moe_config(layers, args.smoke))
    torch.cuda.empty_cache()  # the children need the GPU
    total = torch.cuda.get_device_properties(0).total_memory
    save({"model_bytes": model_bytes, "checkpoint_s": time.perf_counter() - start, "cap": cap})
    print(
        f"checkpoint {model_bytes / 2**30:.1f} GiB; offloaded engines capped at "
        f"{cap / 2**30:.1f} GiB"
    )
    me = [sys.executable, os.path.abspath(__file__)] + (["--smoke"] if args.smoke else [])
    if args.only != "engine":
        chunks = ["--copy-chunks", *map(str, args.copy_chunks)]
        chunks += ["--profile"] if args.profile else []
        subprocess.run([*me, "--stage", "steps", "--path", path, *chunks], check=False)
    for mode in args.engines if args.only != "steps" else ():
        env = dict(os.environ)
        if mode != "resident":
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{cap / total:.4f}"
        done = subprocess.run([*me, "--stage", "engine", "--mode", mode, "--path", path], env=env)
        if done.returncode:
            save({f"engine_error/{mode}": f"exit {done.returncode} (see the log above)"})
    print_tables(load_results(), model_bytes, cap)


if __name__ == "__main__":
    main()
