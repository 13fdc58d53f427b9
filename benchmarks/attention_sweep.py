"""The Pallas GPU attention kernel against copy bandwidth, its tile sweep, and the table it writes.

    python3 benchmarks/attention_sweep.py [--smoke] [--contexts 2048 8192] [--bw BYTES_PER_S]

Decode shape of the 8B model (GQA 32/8, head_dim 128, bf16, page 16, batch 64, random page
order). At each context it times the reference once, then the kernel with the tiles it would
choose now (``pallas-gpu``: the measured table's entry for this GPU, else the defaults), then a
sweep in two rounds, all in the same process against the same inputs:

1. split-KV count x KV pages per block, at 4 warps and 2 stages, 16-row tiles;
2. around round 1's best: 2 and 8 warps, 3 and 4 stages, 32-row tiles.

The fastest configuration becomes this GPU's table entry for the context
(``kernels/ragged_paged_attention/gpu_tuning_table.py``, read by ``tuning.gpu_tiles``): the
whole table, other GPUs' entries kept, is written to ``$OUT/gpu_tuning_table.py``, to be copied
into the repository (then ``ruff format`` it). The kernel is then timed once more with the new
table in force and no tiles given (``pallas-gpu (table)``): what serving will run. Split
counts are limited to those the kernel's split rule can reproduce from ``target_programs``.

``--smoke`` runs tiny shapes in Pallas interpret mode on any backend (CPU here): timings mean
nothing, but every step, the table file included, runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from typing import Any

OUT = os.environ.get("OUT", "/tmp")
SHAPE = {"q_heads": 32, "kv_heads": 8, "head_dim": 128, "page": 16}
SMOKE_SHAPE = {"q_heads": 8, "kv_heads": 2, "head_dim": 16, "page": 16}


def _inputs(batch: int, context: int, shape: dict, dtype: Any) -> tuple:
    import jax
    import jax.numpy as jnp
    import numpy as np

    pages_per_seq = context // shape["page"]
    num_pages = batch * pages_per_seq
    kq, kk, kv = jax.random.split(jax.random.key(context), 3)
    dims = (num_pages, shape["page"], shape["kv_heads"], shape["head_dim"])
    q = jax.random.normal(kq, (batch, shape["q_heads"], shape["head_dim"]), dtype)
    k = jax.random.normal(kk, dims, dtype)
    v = jax.random.normal(kv, dims, dtype)
    table = jnp.asarray(np.random.default_rng(0).permutation(num_pages).reshape(batch, -1))
    layout = (
        jnp.full((batch,), context, jnp.int32),
        table,
        jnp.arange(batch + 1, dtype=jnp.int32),
        jnp.array([batch], jnp.int32),
    )
    return q, k, v, layout


def _time(fn: Any, q: Any, k: Any, v: Any, layout: tuple, iters: int) -> tuple[float, Any]:
    """Seconds per call (after two warm calls) and the first result as float32 numpy."""
    import jax
    import numpy as np

    sm_scale = q.shape[-1] ** -0.5
    call = jax.jit(lambda q, k, v, layout: fn(q, k, v, *layout, sm_scale=sm_scale))
    out = np.asarray(call(q, k, v, layout).block_until_ready(), np.float32)
    call(q, k, v, layout).block_until_ready()
    start = time.perf_counter()
    for _ in range(iters):
        result = call(q, k, v, layout)
    result.block_until_ready()
    return (time.perf_counter() - start) / iters, out


def _programs(batch: int, kv_heads: int, block_q: int) -> int:
    """Programs of one split in a decode call (``gpu.default_num_kv_splits``'s count)."""
    return min(batch, -(-batch // block_q) + batch) * kv_heads


def _reachable_splits(kv_blocks: int) -> list[int]:
    from tpu_kernels.ragged_paged_attention import gpu

    splits, out = 1, []
    while splits <= gpu.MAX_KV_SPLITS and kv_blocks >= splits * gpu.MIN_KV_BLOCKS_PER_SPLIT:
        out.append(splits)
        splits *= 2
    return out or [1]


def _config_name(c: dict) -> str:
    return (
        f"splits={c['splits']} pages={c['pages']} warps={c['warps']} stages={c['stages']} "
        f"rows={c['rows']}"
    )


def sweep_context(
    context: int, bw: float, results: dict, *, batch: int, shape: dict, smoke: bool
) -> dict | None:
    """Times the reference, the current choice and the sweep at ``context``; returns this
    GPU's new table entry (None when no configuration ran)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tpu_kernels.ragged_paged_attention import gpu, reference

    dtype = jnp.float32 if smoke else jnp.bfloat16
    iters = 2 if smoke else 50
    q, k, v, layout = _inputs(batch, context, shape, dtype)
    kv_bytes = 2 * batch * context * shape["kv_heads"] * shape["head_dim"] * q.dtype.itemsize
    group = shape["q_heads"] // shape["kv_heads"]
    group_pad = 1 << (group - 1).bit_length()
    kernel = functools.partial(gpu.ragged_paged_attention, interpret=smoke)

    def record(name: str, fn: Any, ref: Any) -> dict | None:
        try:
            seconds, out = _time(fn, q, k, v, layout, iters)
        except Exception as error:  # a config that fails to build is reported, not fatal
            results[f"attn_{name}@{context}"] = {"error": str(error)[:300]}
            return None
        row = {
            "ms": seconds * 1e3,
            "kv_bytes_s": kv_bytes / seconds,
            "fraction_of_copy_bw": kv_bytes / seconds / bw,
        }
        if ref is not None:
            row["rel_err"] = float(np.abs(out - ref).max() / np.abs(ref).max())
        results[f"attn_{name}@{context}"] = row
        print("attention", context, name, row, flush=True)
        return row

    start = time.perf_counter()
    _, ref = _time(reference.ragged_paged_attention, q, k, v, layout, 1)
    record("reference", reference.ragged_paged_attention, None)
    record("pallas-gpu", kernel, ref)

    def run(c: dict) -> dict | None:
        fn = functools.partial(
            kernel,
            num_kv_splits=c["splits"],
            num_kv_pages_per_block=c["pages"],
            num_warps=c["warps"],
            num_stages=c["stages"],
            block_q=max(1, c["rows"] // group_pad),
        )
        row = record(f"pallas-gpu {_config_name(c)}", fn, ref)
        return None if row is None else {**c, **row}

    pages_options = [2, 4] if smoke else [2, 4, 8]
    timed = []
    for pages in pages_options:
        kv_blocks = -(-context // (pages * shape["page"]))
        for splits in _reachable_splits(kv_blocks)[: 2 if smoke else None]:
            c = {"splits": splits, "pages": pages, "warps": 4, "stages": 2, "rows": 16}
            timed.append(run(c))
    timed = [t for t in timed if t is not None]
    if not timed:
        return None
    best = min(timed, key=lambda t: t["ms"])
    around = [{**best, "warps": w} for w in (2, 8)] + [{**best, "stages": s} for s in (3, 4)]
    around.append({**best, "rows": 32})
    for c in around[: 1 if smoke else None]:
        keys = ("splits", "pages", "warps", "stages", "rows")
        row = run({key: c[key] for key in keys})
        if row is not None:
            timed.append(row)
    best = min(timed, key=lambda t: t["ms"])
    block_q = max(1, best["rows"] // group_pad)
    results[f"attn_best@{context}"] = {"config": _config_name(best), **best}
    results[f"attn_stage@{context}"] = {"seconds": time.perf_counter() - start}
    device = jax.devices()[0].device_kind
    return {
        "device": device,
        "shape": {
            "head_dim": shape["head_dim"],
            "group": group,
            "page_size": shape["page"],
            "dtype": jnp.dtype(dtype).name,
        },
        "decode": True,
        "context": context,
        "tiles": {
            "tile_rows": best["rows"],
            "kv_pages_per_block": best["pages"],
            "target_programs": best["splits"] * _programs(batch, shape["kv_heads"], block_q),
            "num_warps": best["warps"],
            "num_stages": best["stages"],
        },
        "measured": {
            "ms": round(best["ms"], 4),
            "fraction_of_copy_bw": round(best["fraction_of_copy_bw"], 3),
            "batch": batch,
            "num_kv_splits": best["splits"],
            "date": time.strftime("%Y-%m-%d"),
            "by": "benchmarks/gpu_suite.py --kernels-only",
        },
    }


def merged_table(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` without the entries ``new`` replaces (same device, shape, decode and context),
    then ``new``."""

    def key(e: dict) -> tuple:
        return e["device"], json.dumps(e["shape"], sort_keys=True), e["decode"], e["context"]

    replaced = {key(e) for e in new}
    return [e for e in old if key(e) not in replaced] + new


def render_table(entries: list[dict]) -> str:
    """The text of ``gpu_tuning_table.py`` holding ``entries`` (its docstring kept)."""
    from tpu_kernels.ragged_paged_attention import gpu_tuning_table

    doc = (gpu_tuning_table.__doc__ or "").strip()
    # JSON's literals are Python's but for these three (no string of the table holds them).
    body = json.dumps(entries, indent=4)
    for literal, python in ((": true", ": True"), (": false", ": False"), (": null", ": None")):
        body = body.replace(literal, python)
    return f'"""{doc}\n"""\n\nTABLE: list[dict] = {body}\n'


def sweep(contexts: list[int], bw: float, results: dict, *, smoke: bool = False) -> list[dict]:
    """Every context's sweep, the table written to ``$OUT/gpu_tuning_table.py``, and the
    kernel timed again with the new table in force (``pallas-gpu (table)``)."""
    from tpu_kernels.ragged_paged_attention import gpu, gpu_tuning_table

    shape = SMOKE_SHAPE if smoke else SHAPE
    batch = 4 if smoke else 64
    entries = []
    for context in contexts:
        entry = sweep_context(context, bw, results, batch=batch, shape=shape, smoke=smoke)
        if entry is not None:
            entries.append(entry)
    table = merged_table(gpu_tuning_table.TABLE, entries)
    path = os.path.join(OUT, "gpu_tuning_table.py")
    with open(path, "w") as f:
        f.write(render_table(table))
    results["attn_table"] = {"path": path, "entries": entries}
    # What serving runs: no tiles given, the new table in force (read when the kernel is
    # traced, so the traces made with the old table are dropped first).
    import jax
    import jax.numpy as jnp

    saved = gpu_tuning_table.TABLE
    gpu_tuning_table.TABLE = table
    jax.clear_caches()
    try:
        for context in contexts:
            dtype = jnp.float32 if smoke else jnp.bfloat16
            q, k, v, layout = _inputs(batch, context, shape, dtype)
            kernel = functools.partial(gpu.ragged_paged_attention, interpret=smoke)
            seconds, _ = _time(kernel, q, k, v, layout, 2 if smoke else 50)
            kv_bytes = 2 * batch * context * shape["kv_heads"] * shape["head_dim"]
            kv_bytes *= q.dtype.itemsize
            results[f"attn_pallas-gpu (table)@{context}"] = {
                "ms": seconds * 1e3,
                "kv_bytes_s": kv_bytes / seconds,
                "fraction_of_copy_bw": kv_bytes / seconds / bw,
            }
    finally:
        gpu_tuning_table.TABLE = saved
        jax.clear_caches()
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--bw", type=float, default=None, help="copy bandwidth, bytes/s")
    args = parser.parse_args()
    contexts = args.contexts or ([256] if args.smoke else [2048, 8192])
    bw = args.bw or 1e11
    results: dict = {}
    sweep(contexts, bw, results, smoke=args.smoke)
    with open(os.path.join(OUT, "attention_sweep.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results.get("attn_table", {}), indent=1))


if __name__ == "__main__":
    main()
