"""The Pallas GPU kernel's measured tile table: lookup, the kernel reading it, the sweep's file.

The table (``gpu_tuning_table.py``) is written by ``benchmarks/attention_sweep.py`` on a GPU;
here its lookup rules are checked on synthetic entries, the kernel is shown to take its tiles
from the table when the caller gives none (interpret mode, a ``cpu`` entry so that this host's
device matches), and the sweep's rendering of the file is read back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from rpa_inputs import make_batch, reference_attention, rel_err, seed_of

from benchmarks import attention_sweep
from tpu_kernels.ragged_paged_attention import gpu, gpu_tuning_table, tuning

SHAPE = {"head_dim": 128, "group": 4, "page_size": 16, "dtype": "bfloat16"}


def entry(device: str, context: int, rows: int, **shape: object) -> dict:
    tiles = dict(tile_rows=rows, kv_pages_per_block=4, target_programs=1024)
    return {
        "device": device,
        "shape": {**SHAPE, **shape},
        "decode": True,
        "context": context,
        "tiles": {**tiles, "num_warps": 4, "num_stages": 2},
    }


def lookup(table: list[dict], device: str = "NVIDIA H200", context: int = 2048, **shape):
    args = {**SHAPE, **shape}
    return tuning.gpu_tiles(
        device,
        head_dim=args["head_dim"],
        group=args["group"],
        page_size=args["page_size"],
        dtype=args["dtype"],
        decode=True,
        context=context,
        table=table,
    )


def test_nearest_context_in_log_scale():
    table = [entry("NVIDIA H200", 2048, 16), entry("NVIDIA H200", 8192, 32)]
    assert lookup(table, context=1024).tile_rows == 16
    assert lookup(table, context=4000).tile_rows == 16  # log2: 11.97 is nearer 11 than 13
    assert lookup(table, context=4200).tile_rows == 32
    assert lookup(table, context=65536).tile_rows == 32


def test_no_entry_means_defaults():
    """Another GPU, another shape or dtype, or a prefill call: no tiles (the defaults run)."""
    table = [entry("NVIDIA H200", 2048, 16)]
    assert lookup(table, device=" nvidia h200 ") is not None  # device kind: case, spaces
    assert lookup(table, device="NVIDIA H100 80GB HBM3") is None
    assert lookup(table, group=8) is None
    assert lookup(table, dtype=jnp.float32) is None
    assert lookup(table, dtype=jnp.bfloat16) is not None  # a dtype object names the same
    prefill = tuning.gpu_tiles(
        "NVIDIA H200", **{k: SHAPE[k] for k in ("head_dim", "group", "page_size", "dtype")},
        decode=False, context=2048, table=table,
    )  # fmt: skip
    assert prefill is None


def test_h100_entries_reproduce_their_splits():
    """The shipped H100 entries give the split counts the 2026-11-24 sweep measured best (2 at
    2k, 8 at 8k; batch 64, 8 KV heads) through the kernel's own split rule."""
    h100 = "NVIDIA H100 80GB HBM3"
    want = {2048: 2, 8192: 8}
    for context, splits in want.items():
        tiles = lookup(gpu_tuning_table.TABLE, device=h100, context=context)
        block_q = tiles.tile_rows // 4
        kv_blocks = context // 16 // tiles.kv_pages_per_block
        got = gpu.default_num_kv_splits(
            num_tokens=64,
            max_num_seqs=64,
            num_kv_heads=8,
            block_q=block_q,
            kv_blocks_per_seq=kv_blocks,
            target_programs=tiles.target_programs,
        )
        assert got == splits, context


def test_kernel_takes_the_tables_tiles(monkeypatch):
    """With an entry for this host's device the kernel runs the table's tiles: a valid entry
    matches the reference, an invalid one (3 pages a block) is rejected by name."""
    device = jax.devices()[0].device_kind
    seqs = [(1, 40), (1, 150), (1, 7)]
    batch = make_batch(
        seed_of("gpu_table"),
        seqs,
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=16,
        max_num_seqs=8,
        num_tokens=6,  # a decode-shaped call: tokens <= sequence slots
        pages_per_seq=12,
    )
    shape = dict(head_dim=16, group=4, page_size=16, dtype="float32")
    good = entry(device, 256, 32, **shape)
    good["tiles"].update(kv_pages_per_block=2, target_programs=64)
    monkeypatch.setattr(gpu_tuning_table, "TABLE", [good])
    jax.clear_caches()
    got = gpu.ragged_paged_attention(*batch.args(), sm_scale=0.25, interpret=True)
    want = reference_attention(batch, sm_scale=0.25)
    assert rel_err(got, want, batch.num_real_tokens) <= 1e-5

    bad = entry(device, 256, 32, **shape)
    bad["tiles"]["kv_pages_per_block"] = 3
    monkeypatch.setattr(gpu_tuning_table, "TABLE", [bad])
    jax.clear_caches()  # the kernel is jitted: the table is read when it is traced
    with pytest.raises(ValueError, match="num_kv_pages_per_block"):
        gpu.ragged_paged_attention(*batch.args(), sm_scale=0.25, interpret=True)


def test_rendered_table_reads_back(tmp_path):
    """The sweep's file keeps other GPUs' entries, replaces its own, and is valid Python."""
    old = [entry("NVIDIA H100 80GB HBM3", 2048, 16), entry("NVIDIA H200", 2048, 16)]
    new = [entry("NVIDIA H200", 2048, 32)]
    merged = attention_sweep.merged_table(old, new)
    assert [e["device"] for e in merged] == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    assert merged[1]["tiles"]["tile_rows"] == 32
    namespace: dict = {}
    exec(attention_sweep.render_table(merged), namespace)  # noqa: S102 (our own file)
    assert namespace["TABLE"] == merged
    assert namespace["__doc__"].strip() == (gpu_tuning_table.__doc__ or "").strip()
