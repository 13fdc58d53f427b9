"""Does the compiler copy MoE offload's whole device expert cache at each layer? What stops it?

    python3 benchmarks/offload_cache_copies.py [--layers 4] [--variants base unordered region]

The H200 profile of an offloaded decode step (``bench_moe_offload.py --profile``, NOTES) shows,
before every MoE layer's demand-copy loop, two device-to-device copies of the whole expert
cache (gate/up 2.4 GB in 1.13 ms, down in 0.57 ms: 20.8 of a 45 ms step at 12 layers). The
CPU compiler makes them too (2 a layer in a 2-layer smoke model's HLO); the TPU compiler made
them for Qwen3-30B-A3B with an 8 GiB cache even under the model's own router (the planner's
"HLO temporaries 22.45G exceed" on v5e). This probe writes a Qwen3-30B-A3B-shaped checkpoint
with ``--layers`` layers, and for each variant, in a child process of its own (XLA flags are
read once):

* ``base``: the plugin as it is: each layer's fused-MoE output and the cache arrays tied by
  ``lax.optimization_barrier`` (``moe_offload.after_reads``), so the next layer's loop starts
  from values that exist only after the kernel's reads;
* ``unordered``: the same without that tie (what the profile measured);
* ``region``: ``unordered`` plus ``XLA_FLAGS=--xla_gpu_copy_insertion_use_region_analysis=true``
  (copy removal that reasons per control-flow region; on CPU it removes none);

compiles the LRU decode step twice — routed by the declared Zipf affinity (what the benchmarks
time: routing known before any layer runs) and by the model's own router (what serving runs) —
counts ``copy`` instructions of cache-shaped arrays in each compiled HLO, and times decode
steps at batch 1 (declared skew 0.8, a quarter of the experts cached; ``base`` also times the
resident model). The table prints last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT", "/tmp")
FLAGS = {"region": "--xla_gpu_copy_insertion_use_region_analysis=true"}


def unorder() -> None:
    """The plugin without its tie of the kernel's output to the cache (``after_reads``)."""
    from tpu_plugin.layers import moe_offload

    moe_offload.after_reads = lambda out, cache: (out, cache)


def child(path: str, variant: str, steps: int) -> dict:
    import jax.numpy as jnp
    from bench_moe_offload import CACHE, prompts

    from tpu_plugin.tools.direct_steps import ragged_step
    from tpu_plugin.tools.hlo_inventory import copies_of
    from tpu_plugin.tools.offload_steps import empty_caches, load
    from tpu_plugin.tools.skewed_routing import zipf_affinity

    if variant in ("unordered", "region"):
        unorder()
    result: dict = {}
    for mode in ("resident", "lru") if variant == "base" else ("lru",):
        offload = None if mode == "resident" else (mode, ("fraction", float(CACHE)), 0)
        stepper = load(path, 1, offload, dtype=jnp.bfloat16, pages_per_seq=8)
        cfg = stepper.cfg
        affinity = jnp.asarray(zipf_affinity(1, 1, cfg.num_hidden_layers, cfg.num_experts, 0.8))
        if stepper.offload is not None:
            off = stepper.offload
            off.cache = off.fresh_cache()
            shapes = [tuple(off.cache.gate_up.shape), tuple(off.cache.down.shape)]
            result["cache_gb"] = sum(a.nbytes for a in (off.cache.gate_up, off.cache.down)) / 1e9
            kv = off.attach(empty_caches(cfg, 8, jnp.bfloat16))
            step = ragged_step([[5]], [0], 8, 8)
            # the declared router routes without the hidden state; the model's own needs it
            for router, routing in (("skew", affinity), ("model", None)):
                lowered = stepper.jitted.lower(stepper.params, kv, step, routing)
                text = lowered.compile().as_text()
                result[f"cache_copies/{router}"] = copies_of(text, shapes)
                with open(os.path.join(OUT, f"hlo_{variant}_{router}.txt"), "w") as f:
                    f.write(text)
            off.cache, kv = None, None
        run = stepper.run(prompts(1, 64, cfg.vocab_size), steps, affinity)
        result[f"{mode}_ms"] = 1e3 * statistics.median(run.decode_s[1:])
        if run.steady is not None:
            result["hit_rate"] = run.steady["hit_rate"]
            result["fetched_per_step"] = run.steady["fetched"] / (steps - 3)
        stepper = None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--variants", nargs="+", default=["base", "unordered"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", default="/tmp/offload-copies-ckpt")
    args = parser.parse_args()
    if args.child:
        print("RESULT", json.dumps(child(args.path, args.child, args.steps)), flush=True)
        return
    from bench_moe_offload import qwen3_moe_config
    from gpu_suite import write_checkpoint

    if not os.path.exists(os.path.join(args.path, "config.json")):
        write_checkpoint(args.path, qwen3_moe_config(args.layers, smoke=False))
    rows = {}
    for variant in args.variants:
        env = dict(os.environ)
        if variant in FLAGS:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FLAGS[variant]).strip()
        command = [sys.executable, __file__, "--child", variant, "--path", args.path]
        command += ["--steps", str(args.steps)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        rows[variant] = json.loads(lines[-1][7:]) if lines else {"error": done.stderr[-1500:]}
        print(variant, rows[variant], flush=True)
    with open(os.path.join(OUT, "offload_cache_copies.json"), "w") as f:
        json.dump(rows, f, indent=1)
    resident = rows.get("base", {}).get("resident_ms")
    with open(os.path.join(args.path, "config.json")) as f:
        layers = json.load(f)["num_hidden_layers"]
    print(f"\n{layers} layers, batch 1, skew 0.8, LRU, a quarter of the experts cached")
    print(
        "| variant | whole-cache copies in the step: declared router | the model's router "
        "| lru ms/step (declared) | resident ms/step | hit rate |"
    )
    print("|---|---|---|---|---|---|")
    for variant, row in rows.items():
        if "error" in row:
            print(f"| {variant} | failed: {row['error'].splitlines()[-1][:80]} | | | | |")
            continue
        print(
            f"| {variant} | {row['cache_copies/skew']} | {row['cache_copies/model']} | "
            f"{row['lru_ms']:.2f} | "
            f"{resident if resident is None else f'{resident:.2f}'} | {row['hit_rate']:.1%} |"
        )


if __name__ == "__main__":
    main()
