"""Start-up of ``vllm.LLM`` on SmolLM2 with precompilation: empty compile cache vs warm cache.

Each start-up runs in a fresh Python process (``python bench_startup.py --child``), as a user
would start one, with ``TPU_PLUGIN_COMPILE_CACHE`` pointing at a directory that is empty for the
first start-up and filled by it for the second. The child measures ``LLM(...)`` construction
(weights, KV cache, precompilation of every bucket) and one short greedy generate, and prints
one JSON line with the seconds JAX spent tracing, lowering, compiling and reading its cache
(its monitoring events). Target: second start-up <= 1/3 of the first.

Both start-ups import the plugin from one snapshot of ``tpu_plugin``/``kernels`` taken first
(``--no-snapshot`` imports the working tree): the executable cache keys on the plugin's
source, so an edit between the two start-ups (a shared working tree) would make the second
one compile everything again.

    python benchmarks/bench_startup.py [--max-model-len 512 --max-num-seqs 8 --tokens 256]

On the GPU (``TPU_PLUGIN_DEVICE=gpu``), e.g. with gpu_suite.py's 8B checkpoint: ``--model
/tmp/llama-3-8b-random --dtype bfloat16 --max-model-len 784 --max-num-seqs 128 --tokens 8192
--kv-mib 8192``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

MODEL = os.path.expanduser("~/.cache/tpu-plugin/models/SmolLM2-135M-Instruct")
# JAX's monitoring events (summed over every program of the start-up), by short name.
EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile_or_jax_cache",
    "/jax/compilation_cache/cache_retrieval_time_sec": "jax_cache_read",
}


def snapshot(into: str) -> str:
    """Copies the plugin's packages under ``into`` and returns the PYTHONPATH entry."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(
        os.path.join(root, "tpu_plugin"), os.path.join(into, "tpu_plugin"), ignore=ignore
    )
    shutil.copytree(os.path.join(root, "kernels"), os.path.join(into, "tpu_kernels"), ignore=ignore)
    return into


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("TPU_PLUGIN_DEVICE", "cpu")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # time the engine in this process
    start = time.perf_counter()
    import jax

    events: dict[str, float] = {}

    def listener(event: str, duration: float, **_: object) -> None:
        name = EVENTS.get(event)
        if name is not None:
            events[name] = events.get(name, 0.0) + duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    from vllm import LLM, SamplingParams

    imported = time.perf_counter()
    # A random-weight checkpoint (gpu_suite.py's) has no tokenizer: token prompts then.
    has_tokenizer = os.path.exists(os.path.join(args.model, "tokenizer_config.json"))
    llm = LLM(
        skip_tokenizer_init=not has_tokenizer,
        model=args.model,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.tokens,
        kv_cache_memory_bytes=args.kv_mib * 2**20,
        dtype=args.dtype,
    )
    ready = time.perf_counter()
    prompt = "The capital of France is" if has_tokenizer else {"prompt_token_ids": [1, 2, 3, 4]}
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8))
    first = time.perf_counter()
    import tpu_plugin
    from tpu_plugin.runner.compile import step_buckets

    print(
        json.dumps(
            {
                "import_s": imported - start,
                "llm_init_s": ready - imported,
                "first_generate_s": first - ready,
                "total_s": first - start,
                "forward_buckets": len(
                    step_buckets(args.tokens, args.max_num_seqs, args.max_model_len, 16)
                ),
                "text": out[0].outputs[0].text if has_tokenizer else out[0].outputs[0].token_ids,
                "jax_s": {k: round(v, 1) for k, v in sorted(events.items())},
                "plugin": os.path.dirname(tpu_plugin.__file__),
            }
        ),
        flush=True,
    )
    llm.llm_engine.engine_core.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256, help="--max-num-batched-tokens")
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary dir")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-mib", type=int, default=256, help="KV cache size in MiB")
    parser.add_argument("--no-snapshot", action="store_true", help="import the working tree")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    cache = args.cache_dir or tempfile.mkdtemp(prefix="tpu-plugin-bench-cache-")
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, TPU_PLUGIN_COMPILE_CACHE=cache, TPU_PLUGIN_PRECOMPILE="1")
    if not args.no_snapshot:
        source = snapshot(tempfile.mkdtemp(prefix="tpu-plugin-bench-src-"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
    results = []
    for label in ("first (empty cache)", "second (warm cache)"):
        wall = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        line = next(x for x in proc.stdout.splitlines() if x.startswith('{"import_s"'))
        result = json.loads(line)
        result["process_s"] = time.perf_counter() - wall
        results.append(result)
        print(label, json.dumps(result), flush=True)
    ratio = results[1]["llm_init_s"] / results[0]["llm_init_s"]
    print(
        f"LLM() start-up: first {results[0]['llm_init_s']:.1f} s, second "
        f"{results[1]['llm_init_s']:.1f} s, ratio {ratio:.2f} (target <= 0.33)"
    )
    files = sum(len(f) for _, _, f in os.walk(cache))
    executables = len(os.listdir(os.path.join(cache, "executables")))
    print(f"cache {cache}: {files} files, {executables} in executables/")


if __name__ == "__main__":
    main()
