"""Block sizes of the TPU ragged paged attention kernel, per shape and TPU generation.

The kernel (``tpu.py``) has two tiling knobs:

- ``num_queries_per_block`` (``bq``): packed tokens per grid step. Each KV head multiplies a
  ``[group * bq, head_dim]`` query tile against the keys, and a prefill re-reads its KV once per
  query block, so a block does about ``group * bq`` FLOPs per byte of KV (bf16). ``group * bq``
  is set to twice the generation's roofline ridge (peak FLOP/s over HBM bytes/s), rounded to a
  power of two and kept within one to four MXU passes (512 rows on v5e, 1024 on v6e). Decodes
  and short chunks in a block do not pay for its size: the kernel computes each sequence on the
  smallest aligned row tile that holds its rows.
- ``num_kv_pages_per_block`` (``nb``): pages fetched per DMA round. ``nb * page_size`` keys per
  block (about 512) make each round large enough to hide the DMA issue cost and long enough that
  the next round's copy overlaps a full block of compute.

The VMEM footprint of a choice is computed by :func:`vmem_footprint` and kept under a budget of
the generation's VMEM. The specs (VMEM size, MXU width, HBM bandwidth, peak bf16 FLOP/s) are the
public numbers JAX itself ships in ``pltpu.get_tpu_info_for_chip``; this module does not keep a
second copy. Unknown generations fall back to the smallest VMEM and MXU of the table (v4) with a
logged warning.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.experimental.pallas.tpu as pltpu
import numpy as np

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
LANES = 128
TARGET_KV_TOKENS_PER_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """What the tiling needs to know about one TPU generation (per TensorCore, public specs)."""

    name: str
    vmem_bytes: int
    mxu_rows: int  # MXU is mxu_rows x mxu_rows
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    megacore: bool  # two TensorCores share one "parallel" grid

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity above which a kernel is compute-bound (roofline ridge)."""
        return self.bf16_flops_per_s / self.hbm_bytes_per_s


def _from_jax_table(name: str, chip: pltpu.ChipVersion) -> TpuGeneration:
    # JAX ships the public per-TensorCore specs; v4 and v5p are megacore chips (two
    # TensorCores, the kernel's "parallel" grid splits over both), counted here per core.
    info = pltpu.get_tpu_info_for_chip(chip, 1)
    return TpuGeneration(
        name,
        vmem_bytes=info.vmem_capacity_bytes,
        mxu_rows=info.mxu_column_size,
        hbm_bytes_per_s=float(info.mem_bw_bytes_per_second),
        bf16_flops_per_s=float(info.bf16_ops_per_second),
        megacore=chip.supports_megacore,
    )


GENERATIONS: dict[str, TpuGeneration] = {
    "v4": _from_jax_table("v4", pltpu.ChipVersion.TPU_V4),
    "v5e": _from_jax_table("v5e", pltpu.ChipVersion.TPU_V5E),
    "v5p": _from_jax_table("v5p", pltpu.ChipVersion.TPU_V5P),
    "v6e": _from_jax_table("v6e", pltpu.ChipVersion.TPU_V6E),
}
# Unknown generations get the smallest VMEM and MXU of the table: always safe, maybe slow.
FALLBACK = GENERATIONS["v4"]
# Share of VMEM the kernel may plan for; the rest is left to Mosaic's internal scratch.
VMEM_BUDGET_FRACTION = 0.75
# SMEM holds the scalar-prefetched tables (page_indices dominates); 1 MiB per core on v4+.
SMEM_BYTES = 1 * MIB

_ALIASES = {
    "tpu v4": "v4",
    "v4": "v4",
    "tpu v5 lite": "v5e",
    "tpu v5e": "v5e",
    "v5litepod": "v5e",
    "v5e": "v5e",
    "tpu v5": "v5p",
    "tpu v5p": "v5p",
    "v5p": "v5p",
    "tpu v6 lite": "v6e",
    "tpu v6e": "v6e",
    "v6e": "v6e",
}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    num_queries_per_block: int
    num_kv_pages_per_block: int
    vmem_bytes: int  # planned footprint of this choice
    vmem_limit_bytes: int  # what the kernel asks Mosaic for


def detect_generation() -> str | None:
    """The TPU generation being compiled for, or None when it is not a TPU.

    Inside ``jax.sharding.use_abstract_mesh`` over TPU devices (an ahead-of-time compile for
    a TPU topology from a host without one) that is the mesh's device kind, so the block
    sizes are those of the target chip; otherwise the default JAX device's.
    """
    target = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if target is not None and target.platform == "tpu":
        return target.device_kind
    device = jax.devices()[0]
    if device.platform != "tpu":
        return None
    return device.device_kind


@functools.cache
def _warn_unknown(name: str | None) -> None:
    logger.warning(
        "Unknown TPU generation %r: ragged paged attention uses the safe %s block sizes "
        "(pass tpu_generation= one of %s to tune).",
        name,
        FALLBACK.name,
        sorted(GENERATIONS),
    )


def resolve_generation(name: str | None) -> TpuGeneration:
    """Maps a generation name or device kind (``"v5e"``, ``"TPU v5 lite"``) to its specs."""
    key = _ALIASES.get((name or "").strip().lower())
    if key is None:
        _warn_unknown(name)
        return FALLBACK
    return GENERATIONS[key]


def min_row_tile(dtype: np.dtype | str) -> int:
    """Rows of the native VMEM tile: 8 sublanes of 32 bits, packed 16 for 16-bit types."""
    return 8 * max(1, 4 // np.dtype(dtype).itemsize)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def vmem_footprint(
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: np.dtype | str,
    num_queries_per_block: int,
    num_kv_pages_per_block: int,
) -> int:
    """Bytes of VMEM the kernel allocates (with lane padding), plus its largest temporaries."""
    itemsize = np.dtype(dtype).itemsize
    group = num_q_heads // num_kv_heads
    bq, bkv = num_queries_per_block, num_kv_pages_per_block * page_size
    q_row = _round_up(num_q_heads * head_dim, LANES) * itemsize
    # A KV buffer row is one token's [kv_heads, head_dim] tile: kv_heads pad to the sublane
    # tile, head_dim to the lanes.
    kv_row = _round_up(num_kv_heads, min_row_tile(dtype)) * _round_up(head_dim, LANES) * itemsize
    rows = group * bq
    io_blocks = 2 * 2 * bq * q_row  # query and output blocks, double-buffered by Pallas
    kv_buffers = 2 * 2 * bkv * kv_row  # keys and values, two slots each
    softmax_stats = 2 * num_kv_heads * rows * LANES * 4  # running max and sum, f32
    accumulator = num_kv_heads * rows * _round_up(head_dim, LANES) * 4
    temporaries = 4 * rows * _round_up(bkv, LANES) * 4  # scores, probabilities, mask, casts
    return io_blocks + kv_buffers + softmax_stats + accumulator + temporaries


def pick_block_sizes(
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: np.dtype | str,
    tpu_generation: str | None,
    *,
    pages_per_seq: int | None = None,
) -> BlockSizes:
    """Block sizes for one attention shape on one TPU generation (see module doc).

    ``tpu_generation`` is a name (``"v5e"``) or a device kind (``"TPU v6 lite"``); None or an
    unknown name falls back to safe sizes with a warning. ``pages_per_seq`` caps the KV block at
    the longest sequence the page table can describe.
    """
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not group over {num_kv_heads} KV heads")
    gen = resolve_generation(tpu_generation)
    group = num_q_heads // num_kv_heads
    tile = min_row_tile(dtype)
    # A query block of a prefill re-reads its sequence's KV: per KV byte it does
    # ~group * bq FLOPs (bf16), so group * bq rows at twice the ridge keep prefill compute-bound;
    # at least one MXU pass, at most four (VMEM and the waste of half-filled blocks grow).
    rows = 1 << math.ceil(math.log2(2 * gen.ridge_flops_per_byte))
    rows = min(4 * gen.mxu_rows, max(gen.mxu_rows, rows))
    bq = _round_up(max(tile, rows // group), tile)
    nb = max(1, TARGET_KV_TOKENS_PER_BLOCK // page_size)
    if pages_per_seq is not None:
        nb = max(1, min(nb, pages_per_seq))
    budget = int(gen.vmem_bytes * VMEM_BUDGET_FRACTION)

    def footprint(bq: int, nb: int) -> int:
        return vmem_footprint(
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            page_size=page_size,
            dtype=dtype,
            num_queries_per_block=bq,
            num_kv_pages_per_block=nb,
        )

    # Over budget: give up prefill intensity first (down to one MXU pass of rows), then KV
    # block length (down to 128 keys), then both down to the minimum.
    while footprint(bq, nb) > budget:
        if group * bq > gen.mxu_rows and bq > tile:
            bq = max(tile, _round_up(bq // 2, tile))
        elif nb > 1 and nb * page_size > 128:
            nb //= 2
        elif bq > tile:
            bq = max(tile, _round_up(bq // 2, tile))
        elif nb > 1:
            nb //= 2
        else:
            break
    used = footprint(bq, nb)
    if used > budget:
        raise ValueError(
            f"ragged paged attention with {num_kv_heads} KV heads x head_dim {head_dim} x page "
            f"size {page_size} needs {used / MIB:.1f} MiB of VMEM, over the {gen.name} budget of "
            f"{budget / MIB:.1f} MiB; use a smaller page size or shard the KV heads."
        )
    # Ask Mosaic for headroom over the plan (its own temporaries), never past the budget.
    limit = min(budget, max(32 * MIB, used + used // 2))
    return BlockSizes(bq, nb, used, limit)


def check_smem(max_num_seqs: int, pages_per_seq: int) -> None:
    """Fails with the fix when the scalar-prefetched page table cannot fit in SMEM."""
    table_bytes = 4 * (max_num_seqs * pages_per_seq + 2 * max_num_seqs + 1)
    if table_bytes > SMEM_BYTES // 2:
        raise ValueError(
            f"the page table ({max_num_seqs} sequences x {pages_per_seq} pages) needs "
            f"{table_bytes // 1024} KiB of SMEM, over {SMEM_BYTES // 2048} KiB; lower "
            "max_num_seqs or max_model_len, or raise the page (block) size."
        )


# ---- the Pallas GPU kernel: tiles from a measured table (gpu_tuning_table.py) ------------


@dataclasses.dataclass(frozen=True)
class GpuTiles:
    """One measured tile choice of the GPU kernel (see ``gpu_tuning_table.py``)."""

    tile_rows: int  # block_q x the query group padded to a power of two
    kv_pages_per_block: int
    target_programs: int  # split-KV aims for about this many programs
    num_warps: int
    num_stages: int


def _shape_matches(entry: dict, head_dim: int, group: int, page_size: int, dtype: str) -> bool:
    shape = entry["shape"]
    return (
        shape["head_dim"] == head_dim
        and shape["group"] == group
        and shape["page_size"] == page_size
        and shape["dtype"] == dtype
    )


def gpu_tiles(
    device_kind: str,
    *,
    head_dim: int,
    group: int,
    page_size: int,
    dtype: np.dtype | str,
    decode: bool,
    context: int,
    table: list[dict] | None = None,
) -> GpuTiles | None:
    """The measured tiles for this GPU and shape, from the entry whose context is nearest
    (in log scale) to ``context``; None when the table has none (the kernel's defaults)."""
    from .gpu_tuning_table import TABLE

    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    rows = [
        e
        for e in (TABLE if table is None else table)
        if e["device"].strip().lower() == device_kind.strip().lower()
        and e["decode"] == decode
        and _shape_matches(e, head_dim, group, page_size, name)
    ]
    if not rows:
        return None
    best = min(rows, key=lambda e: abs(math.log2(max(1, context)) - math.log2(e["context"])))
    return GpuTiles(**best["tiles"])
