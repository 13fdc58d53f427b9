"""Measured tiles of the Pallas GPU ragged paged attention kernel (``gpu.py``), per GPU.

Read by :func:`tpu_kernels.ragged_paged_attention.tuning.gpu_tiles`. Each entry is the fastest
configuration of one sweep of ``benchmarks/gpu_suite.py --kernels-only`` on one GPU (device
kind as JAX names it), for one attention shape and context, with what it measured; the sweep
writes this whole file (earlier entries kept, its own GPU's replaced) to
``$OUT/gpu_tuning_table.py``, to be copied here. Tiles are stored as
``tile_rows`` (``block_q`` x the query group padded to a power of two), ``kv_pages_per_block``,
``target_programs`` (split-KV: the kernel splits each query block's KV range until about this
many programs exist, see ``gpu.default_num_kv_splits``; the sweep's best split count times the
programs of its call), ``num_warps`` and ``num_stages``.

The H100 entries are the 2026-11-24 sweep (benchmarks/RESULTS.md, v5): 2 splits were the best
at 2k context (84% of copy bandwidth against 82% for 8), 8 splits at 8k (94%). The H200
entries are the 2026-12-02 sweep (benchmarks/NOTES_gpu_suite.md, v6): 2 splits and 4 stages
at 2k (75%), 8 splits and 4 stages at 8k (86%).
"""

TABLE: list[dict] = [
    {
        "device": "NVIDIA H100 80GB HBM3",
        "shape": {"head_dim": 128, "group": 4, "page_size": 16, "dtype": "bfloat16"},
        "decode": True,
        "context": 2048,
        "tiles": {
            "tile_rows": 16,
            "kv_pages_per_block": 4,
            "target_programs": 1024,
            "num_warps": 4,
            "num_stages": 2,
        },
        "measured": {
            "ms": 0.211,
            "fraction_of_copy_bw": 0.84,
            "batch": 64,
            "date": "2026-11-24",
            "by": "benchmarks/gpu_suite.py --kernels-only",
        },
    },
    {
        "device": "NVIDIA H100 80GB HBM3",
        "shape": {"head_dim": 128, "group": 4, "page_size": 16, "dtype": "bfloat16"},
        "decode": True,
        "context": 8192,
        "tiles": {
            "tile_rows": 16,
            "kv_pages_per_block": 4,
            "target_programs": 4096,
            "num_warps": 4,
            "num_stages": 2,
        },
        "measured": {
            "ms": 0.759,
            "fraction_of_copy_bw": 0.94,
            "batch": 64,
            "date": "2026-11-24",
            "by": "benchmarks/gpu_suite.py --kernels-only",
        },
    },
    {
        "device": "NVIDIA H200",
        "shape": {"head_dim": 128, "group": 4, "page_size": 16, "dtype": "bfloat16"},
        "decode": True,
        "context": 2048,
        "tiles": {
            "tile_rows": 16,
            "kv_pages_per_block": 4,
            "target_programs": 1024,
            "num_warps": 4,
            "num_stages": 4,
        },
        "measured": {
            "ms": 0.1672,
            "fraction_of_copy_bw": 0.746,
            "batch": 64,
            "num_kv_splits": 2,
            "date": "2026-12-02",
            "by": "benchmarks/gpu_suite.py --kernels-only",
        },
    },
    {
        "device": "NVIDIA H200",
        "shape": {"head_dim": 128, "group": 4, "page_size": 16, "dtype": "bfloat16"},
        "decode": True,
        "context": 8192,
        "tiles": {
            "tile_rows": 16,
            "kv_pages_per_block": 4,
            "target_programs": 4096,
            "num_warps": 4,
            "num_stages": 4,
        },
        "measured": {
            "ms": 0.5823,
            "fraction_of_copy_bw": 0.857,
            "batch": 64,
            "num_kv_splits": 8,
            "date": "2026-12-02",
            "by": "benchmarks/gpu_suite.py --kernels-only",
        },
    },
]
