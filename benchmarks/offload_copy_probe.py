"""What one demand copy of MoE offload costs inside a step program, by the loop that issues it.

    python benchmarks/offload_copy_probe.py [--experts 64] [--copies 0 8 32]

The offloaded MoE layer copies its missing experts from ``pinned_host`` memory in a loop whose
trip count is data (how many missed). On GPU, XLA runs such a loop on the host: each iteration
reads the loop condition back from the device, so a copy may cost a sync besides its bytes.
This probe times, for one Qwen3-30B-A3B expert (gate/up ``[1536, 2048]`` + down
``[2048, 768]``, bf16, 9.4 MB), programs that copy ``n`` experts into a device cache:

* ``fori dynamic``: ``lax.fori_loop`` with ``n`` an argument (the offload layer's loop),
* ``fori dynamic x4``: the same with four copies an iteration (``copy_chunk`` 4),
* ``unrolled``: ``n`` copies written out at trace time (no loop; one program per ``n``),

and prints ms per copy (slope between the smallest and largest ``n``) beside bytes / the
unrolled program's bandwidth. Run it under different ``XLA_FLAGS`` (e.g. command buffers with
``WHILE,CONDITIONAL``, which put the loop into a CUDA graph) to see what the loop costs.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
from jax import lax

GATE_UP = (1536, 2048)  # Qwen3-30B-A3B: 2 x moe_intermediate 768, hidden 2048
DOWN = (2048, 768)


def host_sharding() -> jax.sharding.Sharding:
    device = jax.devices()[0]
    kinds = {m.kind for m in device.addressable_memories()}
    kind = "pinned_host" if "pinned_host" in kinds else "unpinned_host"
    return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)


def install(cache, host, key, slot, device):
    """Row ``key`` of both host stacks into row ``slot`` of the device cache."""
    out = []
    for c, h in zip(cache, host, strict=True):
        row = jax.device_put(lax.dynamic_index_in_dim(h, key, keepdims=True), device)
        out.append(lax.dynamic_update_index_in_dim(c, row, slot, 0))
    return tuple(out)


def programs(experts: int, slots: int, device):
    """The three copy programs (cache donated, as in the step)."""

    def fori(chunk: int):
        def run(cache, host, n):
            def body(i, cache):
                for j in range(chunk):
                    k = i * chunk + j
                    slot = jnp.where(k < n, k % slots, slots)  # spares: the trash slot
                    cache = install(cache, host, k % experts, slot, device)
                return cache

            return lax.fori_loop(0, (n + chunk - 1) // chunk, body, cache)

        return jax.jit(run, donate_argnums=0)

    def unrolled(n: int):
        def run(cache, host):
            for k in range(n):
                cache = install(cache, host, jnp.int32(k % experts), jnp.int32(k % slots), device)
            return cache

        return jax.jit(run, donate_argnums=0)  # one per n: build it once, outside the timing

    return fori(1), fori(4), unrolled


def timed(fn, cache, repeats: int = 5):
    """Median seconds of ``fn(cache)`` (after one warm-up) and the cache it returns."""
    cache = jax.block_until_ready(fn(cache))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        cache = jax.block_until_ready(fn(cache))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--copies", type=int, nargs="+", default=[0, 8, 32])
    args = parser.parse_args()
    device = jax.devices()[0]
    host_kind = host_sharding()
    keys = jax.random.split(jax.random.key(0), 2)
    host = tuple(
        jax.device_put(jax.random.normal(k, (args.experts, *shape), jnp.bfloat16), host_kind)
        for k, shape in zip(keys, (GATE_UP, DOWN), strict=True)
    )
    slots = 16
    cache = tuple(jnp.zeros((slots + 1, *shape), jnp.bfloat16) for shape in (GATE_UP, DOWN))
    expert_bytes = sum(2 * a * b for a, b in (GATE_UP, DOWN))
    on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    fori1, fori4, unrolled = programs(args.experts, slots, on_device)
    rows: dict[str, list[float]] = {"fori dynamic": [], "fori dynamic x4": [], "unrolled": []}
    for n in args.copies:
        count, straight = jnp.int32(n), unrolled(n)
        for name, fn in (
            ("fori dynamic", lambda c, count=count: fori1(c, host, count)),
            ("fori dynamic x4", lambda c, count=count: fori4(c, host, count)),
            ("unrolled", lambda c, straight=straight: straight(c, host)),
        ):
            seconds, cache = timed(fn, cache)
            rows[name].append(seconds)
    lo, hi = args.copies[0], args.copies[-1]
    unrolled_bw = expert_bytes * (hi - lo) / max(rows["unrolled"][-1] - rows["unrolled"][0], 1e-9)
    print(
        f"\nbackend {jax.default_backend()}, host kind {host_kind.memory_kind}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    print(f"expert {expert_bytes / 1e6:.1f} MB; unrolled copies: {unrolled_bw / 1e9:.1f} GB/s")
    print(
        "| program | "
        + " | ".join(f"{n} copies ms" for n in args.copies)
        + " | ms per copy | x bytes/bw |"
    )
    print("|---|" + "---|" * (len(args.copies) + 2))
    for name, times in rows.items():
        per_copy = (times[-1] - times[0]) / max(hi - lo, 1)
        ratio = per_copy / (expert_bytes / unrolled_bw)
        cells = " | ".join(f"{1e3 * t:.3f}" for t in times)
        print(f"| {name} | {cells} | {1e3 * per_copy:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
