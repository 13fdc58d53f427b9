"""The Pallas GPU quantized matmul alone: weight bytes read per second against copy bandwidth.

    python3 benchmarks/quantized_matmul_sweep.py [--smoke] [--bw BYTES_PER_S] [--no-sweep]

Issue 20's kernel target: at decode sizes (``M`` <= 32) the kernel must read the weight at
>= 85% of the measured copy bandwidth. Shapes: the Llama-3-8B decoder's fused projections
(qkv 6144 x 4096, o 4096 x 4096, gate_up 28672 x 4096, down 4096 x 14336), ``M`` 1, 8 and 32.

1. Every scheme with the tiles serving uses (``gpu.default_config``): int8 and e4m3
   weight-only (W8A16, bf16 activations), int8 and e4m3 W8A8 (activations quantized per row in
   the same program), and the bf16 ``jnp.dot`` XLA runs for unquantized weights, as reference.
   Each result is checked against ``reference.quantized_matmul`` (max error relative to the
   largest output).
2. A tile sweep for int8 W8A16 at ``M`` 1 and 32 on every shape (``block_n`` x ``block_k``
   with the split rule's count, then around the best: twice the splits, 8 warps, 4 stages):
   what the defaults leave on the table.

Timing: one jitted program chains the call over enough weight copies (>= 512 MB) that no call
finds its weight in the 50 MB L2, and is run 10 times; bytes = weight + scales. This is the
kernel as serving runs it, inside a program, the split-K partial sum included. The table
prints last; results go to ``$OUT/quantized_matmul_sweep.json``. ``--smoke``: tiny shapes in
Pallas interpret mode on any backend (the numbers mean nothing; every step runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

OUT = os.environ.get("OUT", "/tmp")
# by bytes, the largest first (the sweep stops at --budget-s)
SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096)}
SMOKE_SHAPES = {"qkv": (384, 256), "down": (256, 512)}
SCHEMES = ("int8-w8a16", "fp8-w8a16", "int8-w8a8", "fp8-w8a8", "bf16-xla")
CHAIN_BYTES = 512 << 20


def _weights(scheme: str, n: int, k: int, copies: int, seed: int = 0) -> list:
    """``copies`` (weight, scale) pairs of the scheme's weight type."""
    import jax
    import jax.numpy as jnp

    from tpu_kernels.quantized_matmul import quantize_per_channel

    out = []
    for c in range(copies):
        w = jax.random.normal(jax.random.key(seed + c), (n, k), jnp.bfloat16) * 0.02
        if scheme == "bf16-xla":
            out.append((w, None))
        else:
            dtype = jnp.int8 if scheme.startswith("int8") else jnp.float8_e4m3fn
            out.append(quantize_per_channel(w, dtype))
    return out


def _call(scheme: str, config: Any, interpret: bool):
    import functools

    import jax.numpy as jnp

    from tpu_kernels.quantized_matmul import gpu

    if scheme == "bf16-xla":
        return lambda x, w, s: x @ w.T
    act = None
    if scheme.endswith("w8a8"):
        act = jnp.int8 if scheme.startswith("int8") else jnp.float8_e4m3fn
    return functools.partial(
        gpu.quantized_matmul, activation_dtype=act, config=config, interpret=interpret
    )


def time_chain(fn: Any, x: Any, weights: list, iters: int) -> tuple[float, Any]:
    """Seconds per call of ``fn`` over the chain (after a warm run) and the first output."""
    import jax

    chain = jax.jit(lambda x, ws: [fn(x, w, s) for w, s in ws])
    first = chain(x, weights)
    jax.block_until_ready(first)
    start = time.perf_counter()
    for _ in range(iters):
        out = chain(x, weights)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters / len(weights), first[0]


def measure(scheme, m, n, k, weights, config, bw, interpret, iters) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tpu_kernels.quantized_matmul import reference

    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    seconds, got = time_chain(_call(scheme, config, interpret), x, weights, iters)
    w, s = weights[0]
    if scheme == "bf16-xla":
        want = x @ w.T
    else:
        act = None if scheme.endswith("w8a16") else w.dtype
        want = reference.quantized_matmul(x, w, s, activation_dtype=act)
    want32, got32 = np.asarray(want, np.float32), np.asarray(got, np.float32)
    error = float(np.max(np.abs(got32 - want32)) / max(np.max(np.abs(want32)), 1e-30))
    nbytes = w.size * w.dtype.itemsize + (0 if s is None else s.size * 4)
    return {
        "scheme": scheme,
        "m": m,
        "n": n,
        "k": k,
        "us": 1e6 * seconds,
        "gb_s": nbytes / seconds / 1e9,
        "of_copy": nbytes / seconds / bw,
        "rel_error": error,
        "config": dataclasses.asdict(config) if config else None,
    }


def candidates(m: int, n: int, k: int, smoke: bool) -> list:
    from tpu_kernels.quantized_matmul import gpu

    block_m = gpu.default_config(m, n, k).block_m
    out = []
    for bn in (16, 32) if smoke else (32, 64, 128):
        for bk in (16, 32) if smoke else (128, 256, 512):
            if n % bn or k % bk:
                continue
            splits = gpu.split_count(m, n, k, block_m, bn, bk)
            out.append(gpu.Config(block_m, bn, bk, splits))
    return out


def variants(config: Any, k: int) -> list:
    out = [dataclasses.replace(config, num_warps=8), dataclasses.replace(config, num_stages=4)]
    if k % (2 * config.splits * config.block_k) == 0:
        out.append(dataclasses.replace(config, splits=2 * config.splits))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--bw", type=float, default=None, help="copy bandwidth, bytes/s")
    parser.add_argument("--no-sweep", action="store_true", help="the default tiles only")
    parser.add_argument("--sweep-only", action="store_true", help="skip step 1's table")
    parser.add_argument(
        "--budget-s", type=float, default=240, help="no sweep step starts after this many s"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    import jax

    from tpu_kernels.quantized_matmul import gpu

    interpret = args.smoke or jax.default_backend() != "gpu"
    if args.bw is None:
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import gpu_suite

        gpu_suite.DEVICE = "cuda" if jax.default_backend() == "gpu" else "cpu"
        args.bw = gpu_suite.copy_bandwidth()
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    batches = (1, 8) if args.smoke else (1, 8, 32)
    iters = 1 if args.smoke else 10
    results: dict = {"copy_bw_bytes_s": args.bw, "default": [], "sweep": []}

    def save() -> None:
        with open(os.path.join(OUT, "quantized_matmul_sweep.json"), "w") as f:
            json.dump(results, f, indent=1)

    def weights_of(scheme: str, n: int, k: int) -> list:
        per_copy = n * k * (2 if scheme == "bf16-xla" else 1)
        return _weights(scheme, n, k, 1 if args.smoke else max(2, -(-CHAIN_BYTES // per_copy)))

    for name, (n, k) in {} if args.sweep_only else shapes.items():
        for scheme in SCHEMES:
            weights = weights_of(scheme, n, k)
            for m in batches:
                config = None if scheme == "bf16-xla" else gpu.default_config(m, n, k)
                row = measure(scheme, m, n, k, weights, config, args.bw, interpret, iters)
                results["default"].append(row | {"shape": name})
                print(name, row, flush=True)
            del weights
            save()
    scheme = "int8-w8a16"
    for name, (n, k) in ({} if args.no_sweep else shapes).items():
        weights = weights_of(scheme, n, k)
        for m in (batches[0], batches[-1]):
            if time.perf_counter() - started > args.budget_s:
                results["sweep_skipped"] = f"{name} M={m}: over --budget-s {args.budget_s}"
                break
            default = measure(
                scheme, m, n, k, weights, gpu.default_config(m, n, k), args.bw, interpret, iters
            )
            rows = [default] + [
                measure(scheme, m, n, k, weights, c, args.bw, interpret, iters)
                for c in candidates(m, n, k, args.smoke)
            ]
            best = gpu.Config(**min(rows, key=lambda r: r["us"])["config"])
            rows += [
                measure(scheme, m, n, k, weights, c, args.bw, interpret, iters)
                for c in variants(best, k)
            ]
            best_row = min(rows, key=lambda r: r["us"])
            results["sweep"].append(
                best_row
                | {"shape": name, "tried": len(rows), "default_of_copy": default["of_copy"]}
            )
            print("best", name, m, best_row, flush=True)
            save()
        del weights

    print(f"\ncopy bandwidth {args.bw / 1e12:.2f} TB/s (read + write); bf16 activations")
    print("| shape (N x K) | M | scheme | us | weight GB/s | of copy bw | max rel. error |")
    print("|---|---|---|---|---|---|---|")
    for r in results["default"]:
        print(
            f"| {r['shape']} {r['n']}x{r['k']} | {r['m']} | {r['scheme']} | {r['us']:.1f} | "
            f"{r['gb_s']:.0f} | {100 * r['of_copy']:.0f}% | {r['rel_error']:.1e} |"
        )
    if results["sweep"]:
        print("\nint8 W8A16, best of the tile sweep against the default tiles:")
        print(
            "| shape | M | default, of copy bw | best, of copy bw | best tiles (block m/n/k, "
            "splits, warps, stages) | tried |"
        )
        print("|---|---|---|---|---|---|")
        for b in results["sweep"]:
            c = b["config"]
            tiles = ", ".join(
                str(c[f])
                for f in ("block_m", "block_n", "block_k", "splits", "num_warps", "num_stages")
            )
            print(
                f"| {b['shape']} | {b['m']} | {100 * b['default_of_copy']:.0f}% | "
                f"{100 * b['of_copy']:.0f}% | {tiles} | {b['tried']} |"
            )


if __name__ == "__main__":
    main()
