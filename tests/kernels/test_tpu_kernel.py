"""The Mosaic TPU ragged paged attention kernel, run in TPU interpret mode on CPU, vs the reference.

Relative error is max|kernel - reference| / max|reference| over the real token rows (fp32 within
1e-5, bf16 within 1e-2); padding token rows must be exactly zero. Each case draws fresh random
inputs (seeded by its parameters) with hostile padding: garbage in every padding slot and NaN in
every cache slot that holds no real key (see ``rpa_inputs``).

The output is poisoned: TPU interpret mode fills every buffer the kernel allocates, the output
blocks included, with NaN before the kernel runs (``uninitialized_memory="nan"``), so a real row
the kernel forgot to write comes back NaN and fails;
``test_interpret_mode_poisons_unwritten_output`` proves that premise. Out-of-bounds reads raise
(``out_of_bounds_reads="raise"``).

Interpret mode is slow: a representative subset runs by default, the full sweep is ``slow``.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from rpa_inputs import (
    MIXES,
    PADDING_CASES,
    check_padding_rows_zero,
    make_batch,
    reference_attention,
    rel_err,
    seed_of,
)

from tpu_kernels.ragged_paged_attention import tpu, tuning

FP32_TOL = 1e-5
BF16_TOL = 1e-2
INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")


def tol_of(dtype) -> float:
    return FP32_TOL if jnp.dtype(dtype) == jnp.float32 else BF16_TOL


def check_kernel(
    batch, *, block=(16, 2), interpret=INTERPRET, prefetch_across_steps=None, **kwargs
):
    """Runs kernel and reference on ``batch`` and checks the kernel's numbers."""
    want = reference_attention(batch, **kwargs)
    bq, nb = block if block is not None else (None, None)
    got = tpu.ragged_paged_attention(
        *batch.args(),
        **kwargs,
        num_queries_per_block=bq,
        num_kv_pages_per_block=nb,
        prefetch_across_steps=prefetch_across_steps,
        interpret=interpret,
    )
    assert got.shape == want.shape and got.dtype == want.dtype
    real = batch.num_real_tokens
    got32 = np.asarray(got.astype(jnp.float32))
    assert np.all(np.isfinite(got32)), "unwritten (NaN) or non-finite output rows"
    check_padding_rows_zero(got, real)
    if real:
        err = rel_err(got, want, real)
        assert err <= tol_of(batch.dtype), f"relative error {err:.3g}"


# ---------------------------------------------------------------- default (fast) subset


@pytest.mark.parametrize(
    "mix, dtype, block",
    [
        ("decode_only", jnp.float32, (16, 2)),
        ("prefill_only", jnp.float32, (16, 2)),
        ("chunked_prefill", jnp.float32, (8, 3)),
        ("mixed", jnp.float32, (16, 1)),
        ("mixed", jnp.bfloat16, (32, 4)),
        ("page_boundaries", jnp.float32, (8, 2)),
        ("partial_last_page", jnp.bfloat16, (32, 2)),
    ],
)
def test_batch_mixes(mix, dtype, block):
    seqs = MIXES[mix]
    batch = make_batch(seed_of("kernel_mix", mix, dtype, block), seqs, dtype=dtype)
    check_kernel(batch, block=block, sm_scale=128**-0.5)


@pytest.mark.parametrize("group", [1, 3, 8])
def test_gqa_ratios(group):
    batch = make_batch(
        seed_of("kernel_gqa", group),
        [(1, 20), (9, 30), (5, 5)],
        num_q_heads=2 * group,
        num_kv_heads=2,
        head_dim=64,
    )
    check_kernel(batch, sm_scale=0.125)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_single_kv_head(dtype):
    """One KV head (MQA, or a device's share under tensor parallelism = KV heads): the kernel
    reads the pages as [pages, page_size, head_dim] (tpu.py says why)."""
    batch = make_batch(
        seed_of("kernel_one_head", dtype),
        MIXES["mixed"],
        num_q_heads=4,
        num_kv_heads=1,
        head_dim=128,
        dtype=dtype,
    )
    check_kernel(batch, block=(16, 2), sm_scale=128**-0.5)


@pytest.mark.parametrize("head_dim, dtype", [(64, jnp.float32), (256, jnp.bfloat16)])
def test_head_dims(head_dim, dtype):
    batch = make_batch(
        seed_of("kernel_dim", head_dim), MIXES["mixed"], head_dim=head_dim, dtype=dtype
    )
    check_kernel(batch, block=(32, 2), sm_scale=head_dim**-0.5)


@pytest.mark.parametrize("window, block", [(5, (8, 1)), (40, (16, 2))])
def test_sliding_window(window, block):
    batch = make_batch(seed_of("kernel_window", window), MIXES["mixed"])
    check_kernel(batch, block=block, sm_scale=0.1, sliding_window=window)


def test_soft_cap_and_window_bf16():
    batch = make_batch(seed_of("kernel_cap"), MIXES["mixed"], dtype=jnp.bfloat16, page_size=32)
    check_kernel(batch, block=(32, 1), sm_scale=0.2, soft_cap=5.0, sliding_window=24)


@pytest.mark.parametrize("name, seqs, max_num_seqs, num_tokens, sm_scale", PADDING_CASES)
def test_padding_never_leaks(name, seqs, max_num_seqs, num_tokens, sm_scale):
    """Garbage sequence slots, whole query blocks of padding, empty and zero-length sequences."""
    batch = make_batch(
        seed_of("kernel_" + name), seqs, max_num_seqs=max_num_seqs, num_tokens=num_tokens
    )
    check_kernel(batch, block=(8, 2), sm_scale=sm_scale)


def test_default_block_sizes_under_jit():
    """Block sizes from tuning.py, called from inside a user's jit like the attention layer."""
    batch = make_batch(seed_of("kernel_defaults"), MIXES["mixed"], dtype=jnp.bfloat16)
    want = reference_attention(batch, sm_scale=0.1)

    @jax.jit
    def layer(*args):
        return tpu.ragged_paged_attention(*args, sm_scale=0.1, interpret=True)

    got = layer(*batch.args())
    assert rel_err(got, want, batch.num_real_tokens) <= BF16_TOL


@pytest.mark.parametrize("across_steps", [True, False])
@pytest.mark.parametrize("dma_execution_mode", ["on_wait", "eager"])
def test_double_buffering_has_no_races(dma_execution_mode, across_steps):
    """The interpreter's race detector sees every DMA into a slot ordered before its reads.

    "on_wait" runs a copy when it is waited on (a read before the wait sees NaN); "eager" runs
    it when started (a slot overwritten while still in use would race). With
    ``prefetch_across_steps`` the chain of copies also crosses grid steps.
    """
    race_state = pytest.importorskip("jax._src.pallas.mosaic.interpret.interpret_pallas_call")
    batch = make_batch(seed_of("kernel_races"), MIXES["mixed"])
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode=dma_execution_mode)
    check_kernel(
        batch,
        block=(16, 2),
        interpret=params,
        sm_scale=0.1,
        sliding_window=30,
        prefetch_across_steps=across_steps,
    )
    assert race_state.races is not None and not race_state.races.races_found


def test_parallel_grid_order_does_not_matter():
    """Without cross-step prefetch the grid is "parallel" (megacore splits it): steps must not
    depend on each other, so the interpreter may run them in any order."""
    batch = make_batch(seed_of("kernel_order"), MIXES["mixed"])
    params = pltpu.InterpretParams(random_seed=7)
    check_kernel(batch, block=(8, 2), interpret=params, sm_scale=0.1, prefetch_across_steps=False)


def test_interpret_mode_poisons_unwritten_output():
    """The premise of the NaN check: an output row a kernel does not write comes back NaN."""

    def half_kernel(x_ref, o_ref):
        o_ref[:4] = x_ref[:4]

    out = pl.pallas_call(
        half_kernel,
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        grid=(1,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        interpret=INTERPRET,
    )(jnp.ones((8, 128), jnp.float32))
    assert np.all(np.asarray(out[:4]) == 1.0)
    assert np.all(np.isnan(np.asarray(out[4:])))


@pytest.mark.parametrize(
    "device_kind, dtype, head_dim, group, page_size, kv_heads",
    [
        ("TPU v5 lite", jnp.bfloat16, 128, 4, 16, 2),
        ("TPU v6 lite", jnp.bfloat16, 256, 8, 128, 2),
        ("TPU v5", jnp.float32, 64, 1, 32, 2),
        ("TPU v6 lite", jnp.bfloat16, 128, 8, 16, 1),  # one KV head: 3-D pages
    ],
)
def test_lowers_to_mosaic(device_kind, dtype, head_dim, group, page_size, kv_heads):
    """Interpret mode accepts any jnp; this checks that every op has a Mosaic lowering rule.

    It runs Pallas' TPU lowering on CPU for an abstract TPU device. Mosaic's own layout passes
    and the TPU compiler need libtpu and are not exercised here.
    """
    batch = make_batch(
        seed_of("lower", device_kind, kv_heads),
        [(1, 30), (20, 50)],
        num_q_heads=kv_heads * group,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
    )
    args = batch.args()
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device
    )

    def attention(*args):
        return tpu.ragged_paged_attention(
            *args, sm_scale=0.1, sliding_window=64, soft_cap=30.0, tpu_generation=device_kind
        )

    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(attention).trace(*args).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


def test_rejects_bad_head_grouping():
    batch = make_batch(seed_of("kernel_bad"), [(1, 4)], num_q_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="do not group"):
        tpu.ragged_paged_attention(*batch.args(), sm_scale=1.0, interpret=True)


# ---------------------------------------------------------------- tuning


@pytest.mark.parametrize("generation", sorted(tuning.GENERATIONS))
@pytest.mark.parametrize("num_q_heads, num_kv_heads", [(32, 8), (8, 1), (16, 16), (64, 8)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("page_size", [16, 64, 256])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_sizes_fit_vmem(generation, num_q_heads, num_kv_heads, head_dim, page_size, dtype):
    gen = tuning.GENERATIONS[generation]
    shape = dict(
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
    )
    smallest = tuning.vmem_footprint(
        **shape, num_queries_per_block=tuning.min_row_tile(dtype), num_kv_pages_per_block=1
    )
    if smallest > gen.vmem_bytes * tuning.VMEM_BUDGET_FRACTION:
        # Even one page per slot does not fit (e.g. 16 fp32 heads x 256 x 256-token pages on v4).
        with pytest.raises(ValueError, match="VMEM"):
            tuning.pick_block_sizes(*shape.values(), generation)
        return
    sizes = tuning.pick_block_sizes(*shape.values(), generation)
    footprint = tuning.vmem_footprint(
        **shape,
        num_queries_per_block=sizes.num_queries_per_block,
        num_kv_pages_per_block=sizes.num_kv_pages_per_block,
    )
    assert footprint == sizes.vmem_bytes
    assert footprint <= sizes.vmem_limit_bytes <= gen.vmem_bytes * tuning.VMEM_BUDGET_FRACTION
    assert sizes.num_queries_per_block % tuning.min_row_tile(dtype) == 0
    assert sizes.num_kv_pages_per_block >= 1


def test_block_sizes_follow_the_roofline():
    """Llama-3-8B shape: group 4; group x bq is twice the ridge, in whole MXU passes."""
    v5e = tuning.pick_block_sizes(32, 8, 128, 16, "bfloat16", "v5e")
    v6e = tuning.pick_block_sizes(32, 8, 128, 16, "bfloat16", "TPU v6 lite")
    assert 4 * v5e.num_queries_per_block == 512  # ridge ~240 FLOP/byte, 4 x 128-row passes
    assert 4 * v6e.num_queries_per_block == 1024  # ridge ~560 FLOP/byte, 4 x 256-row passes
    for sizes, gen in ((v5e, "v5e"), (v6e, "v6e")):
        assert 4 * sizes.num_queries_per_block >= tuning.GENERATIONS[gen].ridge_flops_per_byte
    assert v5e.num_kv_pages_per_block * 16 == tuning.TARGET_KV_TOKENS_PER_BLOCK


def test_kv_block_capped_by_page_table():
    sizes = tuning.pick_block_sizes(8, 2, 128, 16, "float32", "v5e", pages_per_seq=3)
    assert sizes.num_kv_pages_per_block == 3


def test_unknown_generation_falls_back_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=tuning.__name__):
        sizes = tuning.pick_block_sizes(32, 8, 128, 16, "bfloat16", "v99z")
    assert "Unknown TPU generation 'v99z'" in caplog.text
    fallback = tuning.pick_block_sizes(32, 8, 128, 16, "bfloat16", tuning.FALLBACK.name)
    assert sizes == fallback


def test_too_big_for_vmem_names_the_fix():
    with pytest.raises(ValueError, match="smaller page size or shard the KV heads"):
        tuning.pick_block_sizes(64, 64, 256, 256, "float32", "v4")


def test_page_table_too_big_for_smem_names_the_fix():
    tuning.check_smem(256, 128)
    with pytest.raises(ValueError, match="lower max_num_seqs or max_model_len"):
        tuning.check_smem(256, 8192)


# ---------------------------------------------------------------- full sweep (slow)


@pytest.mark.slow
@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block", [(8, 1), (16, 3), (32, 8)])
def test_sweep_mixes(mix, dtype, block):
    batch = make_batch(seed_of("sweep_mix", mix, dtype, block), MIXES[mix], dtype=dtype)
    check_kernel(batch, block=block, sm_scale=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("group", range(1, 9))
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sweep_gqa_head_dim(group, head_dim, dtype):
    batch = make_batch(
        seed_of("sweep_gqa", group, head_dim, dtype),
        MIXES["mixed"],
        num_q_heads=group,
        num_kv_heads=1,
        head_dim=head_dim,
        dtype=dtype,
    )
    check_kernel(batch, block=(32, 2), sm_scale=head_dim**-0.5)


@pytest.mark.slow
@pytest.mark.parametrize("page_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize(
    "window, soft_cap", [(None, None), (7, None), (None, 10.0), (64, 3.0), (300, None)]
)
def test_sweep_page_sizes_window_cap(page_size, window, soft_cap):
    seqs = [(1, 300), (37, 37), (1, 17), (64, 500), (5, 260)]
    batch = make_batch(
        seed_of("sweep_page", page_size, window, soft_cap), seqs, page_size=page_size
    )
    check_kernel(batch, block=(16, 2), sm_scale=0.1, sliding_window=window, soft_cap=soft_cap)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_sweep_random_batches(seed):
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(rng.integers(1, 12)):
        kv = int(rng.integers(1, 200))
        q = 1 if rng.random() < 0.5 else int(rng.integers(1, kv + 1))
        seqs.append((q, kv))
    dtype = jnp.bfloat16 if seed % 2 else jnp.float32
    batch = make_batch(seed_of("sweep_random", seed), seqs, dtype=dtype, max_num_seqs=16)
    window = None if seed % 3 else int(rng.integers(1, 100))
    check_kernel(batch, block=(16, 4), sm_scale=0.1, sliding_window=window)
