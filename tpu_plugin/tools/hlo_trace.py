"""A profiler trace joined to the HLO kernel inventory (``hlo_inventory.inventory``): the
device time of each kernel and role of a compiled step. Apart from the inventory, which reads
only HLO text, because this half reads JAX profiler files."""

from __future__ import annotations

import collections
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tpu_plugin.tools.hlo_inventory import Kernel


def trace_events(path: str) -> list[tuple[str, float]]:
    """``(instruction name, duration ns)`` of every kernel of an xplane trace (``.xplane.pb``).

    An accelerator's kernels are the events of its planes' stream lines, named by their
    ``hlo_op`` stat (the HLO instruction that launched them; a library kernel's own name when
    it has none). With no accelerator kernel in the trace (JAX CPU, or a host whose libtpu
    adds an empty TPU plane) they are the host runtime's events that carry an ``hlo_op`` stat.
    """
    from jax.profiler import ProfileData

    planes = list(ProfileData.from_file(path).planes)
    device, host = [], []
    for plane in planes:
        on_device = plane.name.startswith("/device:")
        for line in plane.lines:
            # XLA Modules / XLA Ops lines of a device plane summarise its stream lines
            if on_device and "stream" not in line.name.lower():
                continue
            for event in line.events:
                name = dict(event.stats or ()).get("hlo_op")
                if on_device:
                    device.append((str(name or event.name), float(event.duration_ns)))
                elif name is not None:
                    host.append((str(name), float(event.duration_ns)))
    return device or host


def join_trace(kernels: list[Kernel], events: list[tuple[str, float]], steps: int) -> dict:
    """Device time per kernel and per role from profiler events ``(hlo_op or name, ns)`` of
    ``steps`` runs of the program; events that name no instruction are kept as ``unmatched``
    (library kernels the trace names by their own name)."""
    by_name = {k.name: k for k in kernels}
    by_name |= {child: k for k in kernels for child in k.children if child not in by_name}
    sanitized = {re.sub(r"[.\-]", "_", n): k for n, k in by_name.items()}
    per_kernel: dict[str, float] = collections.Counter()
    per_role: dict[str, float] = collections.Counter()
    calls: dict[str, int] = collections.Counter()
    unmatched: dict[str, float] = collections.Counter()
    for name, ns in events:
        kernel = by_name.get(name) or sanitized.get(re.sub(r"[.\-]", "_", name))
        if kernel is None:
            unmatched[name[:100]] += ns
            continue
        per_kernel[kernel.name] += ns
        per_role[kernel.role] += ns
        calls[kernel.name] += 1  # a loop: every launch of its body's kernels
    scale = 1e-6 / max(1, steps)

    def ranked(counts: dict[str, float]) -> list[tuple[str, float]]:
        return sorted(counts.items(), key=lambda item: -item[1])

    return {
        "ms_per_step_by_role": {r: v * scale for r, v in ranked(per_role)},
        "ms_per_step_by_kernel": {
            n: {"ms": v * scale, "calls": calls[n] / max(1, steps), "role": by_name[n].role}
            for n, v in ranked(per_kernel)
        },
        "unmatched_ms_per_step": {n: v * scale for n, v in ranked(unmatched)[:30]},
    }
