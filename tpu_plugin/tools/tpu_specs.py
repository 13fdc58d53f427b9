"""Published per-chip figures of each TPU generation, the planner's capacity and roofline.

The planner (``tpu_plugin.tools.plan``) compiles the engine's programs for abstract TPU
devices: the compiler tells how many bytes and FLOPs a program moves, not how much memory
the chip has or how fast it is. Those come from Google Cloud's TPU documentation, one row
per generation with the page it is read from. ``kernels/ragged_paged_attention/tuning.py``
reads JAX's own per-TensorCore table (``pltpu.get_tpu_info_for_chip``) for block sizes; the
two agree except for v5p's HBM bandwidth (JAX's table: 2 x 1230 GB/s, the v5p page 2765 GB/s)
and v4's HBM, where the documented figures are used here.

A JAX device is a chip, except where a chip's two TensorCores are two devices (TPU7x, and v4
as ``get_topology_desc`` describes it); :func:`device_spec` divides the chip's figures by the
devices per chip.
"""

from __future__ import annotations

import dataclasses
from typing import Any

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU chip as documented: HBM capacity and bandwidth, peak dense bf16 FLOP/s."""

    name: str  # the topology prefix get_topology_desc takes: v5e, v6e, v5p, TPU7x, v4
    device_kind: str  # what JAX reports for its devices
    hbm_bytes: int
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    tensor_cores: int
    source: str

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity above which a program is compute-bound on this chip."""
        return self.bf16_flops_per_s / self.hbm_bytes_per_s


CHIPS: dict[str, ChipSpec] = {
    chip.name: chip
    for chip in (
        # "HBM2 capacity and bandwidth: 16 GB, 819 GBps; peak compute per chip (bf16) 197 TFLOPs"
        ChipSpec("v5e", "TPU v5 lite", 16 * GIB, 819e9, 197e12, 1,
                 "https://cloud.google.com/tpu/docs/v5e"),
        # "Peak compute per chip (bf16) 918 TFLOPs; HBM capacity per chip 32 GB; HBM bandwidth
        # per chip 1638 GBps" (the TPU7x page's table says 32 GiB for v6e)
        ChipSpec("v6e", "TPU v6 lite", 32 * GIB, 1638e9, 918e12, 1,
                 "https://cloud.google.com/tpu/docs/v6e"),
        # "Peak compute per chip (bf16) 459 TFLOPs; HBM2e capacity and bandwidth 95 GB,
        # 2765 GBps" (95 GiB in the TPU7x page's table); two TensorCores as one megacore device
        ChipSpec("v5p", "TPU v5", 95 * GIB, 2765e9, 459e12, 2,
                 "https://cloud.google.com/tpu/docs/v5p"),
        # "Peak compute per chip (BF16) 2307 TFLOPs (FP8 4614); HBM capacity per chip 192 GiB;
        # HBM bandwidth per chip 7380 GB/s; 2 TensorCores per chip"
        ChipSpec("TPU7x", "TPU7x", 192 * GIB, 7380e9, 2307e12, 2,
                 "https://cloud.google.com/tpu/docs/tpu7x"),
        # "Peak compute per chip 275 teraflops (bf16 or int8); HBM2 capacity and bandwidth
        # 32 GiB, 1200 GBps"; two TensorCores
        ChipSpec("v4", "TPU v4", 32 * GIB, 1200e9, 275e12, 2,
                 "https://cloud.google.com/tpu/docs/v4"),
    )
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """What one JAX device of a topology has: its share of the chip."""

    chip: ChipSpec
    devices_per_chip: int

    @property
    def hbm_bytes(self) -> int:
        return self.chip.hbm_bytes // self.devices_per_chip

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.chip.hbm_bytes_per_s / self.devices_per_chip

    @property
    def bf16_flops_per_s(self) -> float:
        return self.chip.bf16_flops_per_s / self.devices_per_chip


def chip_of(device_kind: str) -> ChipSpec:
    """The chip whose JAX devices report ``device_kind``; raises naming the known ones."""
    for chip in CHIPS.values():
        if chip.device_kind.lower() == device_kind.lower():
            return chip
    known = ", ".join(f"{c.name} ({c.device_kind!r})" for c in CHIPS.values())
    raise ValueError(f"no published figures for TPU device kind {device_kind!r}; known: {known}")


def device_spec(device: Any) -> DeviceSpec:
    """The documented figures of one (abstract) TPU device of a topology.

    A device with fewer TensorCores than its chip (``num_cores``) is a part of the chip:
    TPU7x exposes each of its two TensorCores as a device.
    """
    chip = chip_of(device.device_kind)
    cores = int(getattr(device, "num_cores", chip.tensor_cores) or chip.tensor_cores)
    return DeviceSpec(chip, max(1, chip.tensor_cores // cores))
