"""The Pallas GPU (Triton) ragged paged attention kernel, in Pallas interpret mode on CPU, vs the
reference.

Relative error is max|kernel - reference| / max|reference| over the real token rows (fp32 within
1e-5, bf16 within 1e-2); padding token rows must be exactly zero. Each case draws fresh random
inputs (seeded by its parameters) with hostile padding: garbage in every padding slot and NaN in
every cache slot that holds no real key (see ``rpa_inputs``). A real row the kernel forgot to
write would come back zero or garbage and fail the error bound (reference rows are not zero).

Interpret mode checks the numbers, not Triton: ``test_lowers_to_triton`` runs Pallas' Triton
lowering on CPU for an abstract H100 (Triton's own compiler to PTX is not exercised).

A representative subset runs by default, the full sweep is ``slow``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rpa_inputs import (
    MIXES,
    PADDING_CASES,
    check_padding_rows_zero,
    make_batch,
    reference_attention,
    rel_err,
    seed_of,
)

from tpu_kernels.ragged_paged_attention import gpu

FP32_TOL = 1e-5
BF16_TOL = 1e-2


def tol_of(dtype) -> float:
    return FP32_TOL if jnp.dtype(dtype) == jnp.float32 else BF16_TOL


def check_kernel(batch, *, block=(None, None), **kwargs):
    """Runs kernel (interpret mode) and reference on ``batch`` and checks the kernel's numbers."""
    want = reference_attention(batch, **kwargs)
    block_q, pages = block
    got = gpu.ragged_paged_attention(
        *batch.args(), **kwargs, block_q=block_q, num_kv_pages_per_block=pages, interpret=True
    )
    assert got.shape == want.shape and got.dtype == want.dtype
    real = batch.num_real_tokens
    assert np.all(np.isfinite(np.asarray(got.astype(jnp.float32)))), "non-finite output rows"
    check_padding_rows_zero(got, real)
    if real:
        err = rel_err(got, want, real)
        assert err <= tol_of(batch.dtype), f"relative error {err:.3g}"


# ---------------------------------------------------------------- default (fast) subset


@pytest.mark.parametrize(
    "mix, dtype, block",
    [
        ("decode_only", jnp.float32, (16, 2)),
        ("prefill_only", jnp.float32, (16, 1)),
        ("chunked_prefill", jnp.float32, (8, 4)),
        ("mixed", jnp.bfloat16, (None, None)),
        ("page_boundaries", jnp.float32, (4, 2)),
        ("partial_last_page", jnp.bfloat16, (32, 2)),
    ],
)
def test_batch_mixes(mix, dtype, block):
    seqs = MIXES[mix]
    batch = make_batch(seed_of("gpu_mix", mix, dtype, block), seqs, dtype=dtype)
    check_kernel(batch, block=block, sm_scale=128**-0.5)


@pytest.mark.parametrize("group", [1, 3, 8])
def test_gqa_ratios(group):
    """Groups that are not powers of two are padded inside the kernel's tile."""
    batch = make_batch(
        seed_of("gpu_gqa", group),
        [(1, 20), (9, 30), (5, 5)],
        num_q_heads=2 * group,
        num_kv_heads=2,
        head_dim=64,
    )
    check_kernel(batch, block=(16, 1), sm_scale=0.125)


@pytest.mark.parametrize("head_dim, dtype", [(64, jnp.float32), (128, jnp.bfloat16)])
def test_head_dims(head_dim, dtype):
    batch = make_batch(seed_of("gpu_dim", head_dim), MIXES["mixed"], head_dim=head_dim, dtype=dtype)
    check_kernel(batch, block=(8, 2), sm_scale=head_dim**-0.5)


@pytest.mark.parametrize("window, block", [(5, (4, 1)), (40, (16, 2))])
def test_sliding_window(window, block):
    batch = make_batch(seed_of("gpu_window", window), MIXES["mixed"])
    check_kernel(batch, block=block, sm_scale=0.1, sliding_window=window)


def test_soft_cap_and_window_bf16():
    batch = make_batch(seed_of("gpu_cap"), MIXES["mixed"], dtype=jnp.bfloat16, page_size=32)
    check_kernel(batch, block=(8, 1), sm_scale=0.2, soft_cap=5.0, sliding_window=24)


def test_soft_cap_fp32():
    batch = make_batch(seed_of("gpu_cap32"), MIXES["chunked_prefill"])
    check_kernel(batch, sm_scale=0.5, soft_cap=30.0)


@pytest.mark.parametrize("name, seqs, max_num_seqs, num_tokens, sm_scale", PADDING_CASES)
def test_padding_never_leaks(name, seqs, max_num_seqs, num_tokens, sm_scale):
    """Garbage sequence slots, whole query blocks of padding, empty and zero-length sequences."""
    batch = make_batch(
        seed_of("gpu_" + name), seqs, max_num_seqs=max_num_seqs, num_tokens=num_tokens
    )
    check_kernel(batch, block=(8, 2), sm_scale=sm_scale)


def test_query_blocks_table():
    """The work table: per-sequence blocks, padding slots and spare programs get none."""
    kv_lens = jnp.array([10, 5, 99, 99], jnp.int32)
    query_start_loc = jnp.array([0, 6, 7, 2, 9], jnp.int32)  # slots 2, 3 are garbage
    work = gpu.query_blocks(
        kv_lens, query_start_loc, jnp.array([2], jnp.int32), block_q=4, num_programs=6
    )
    seq, first_token, tokens, first_position = np.asarray(work)
    np.testing.assert_array_equal(tokens, [4, 2, 1, 0, 0, 0])
    np.testing.assert_array_equal(seq[:3], [0, 0, 1])
    np.testing.assert_array_equal(first_token[:3], [0, 4, 6])
    np.testing.assert_array_equal(first_position[:3], [4, 8, 4])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(page_size=12), "page_size to be a power of two"),
        (dict(head_dim=96), "head_dim to be a power of two"),
    ],
)
def test_rejects_non_power_of_two_shapes(kwargs, message):
    batch = make_batch(seed_of("gpu_bad", kwargs), [(2, 5)], **kwargs)
    with pytest.raises(ValueError, match=message):
        gpu.ragged_paged_attention(*batch.args(), sm_scale=0.1, interpret=True)


def test_rejects_tiles_too_small_for_dot():
    batch = make_batch(seed_of("gpu_small"), [(2, 5)], num_q_heads=2, num_kv_heads=2)
    with pytest.raises(ValueError, match="at least 16"):
        gpu.ragged_paged_attention(*batch.args(), sm_scale=0.1, block_q=8, interpret=True)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("dtype, group", [(jnp.float32, 1), (jnp.bfloat16, 3)])
def test_lowers_to_triton(dtype, group):
    """Interpret mode accepts any jnp; this checks that every op has a Triton lowering rule.

    It runs Pallas' Triton lowering on CPU for an abstract H100. Triton's compiler (TTIR to
    PTX) needs a GPU build of jaxlib and is not exercised here.
    """
    batch = make_batch(
        seed_of("gpu_lower", dtype, group),
        [(1, 30), (20, 50)],
        num_q_heads=2 * group,
        num_kv_heads=2,
        dtype=dtype,
    )
    args = batch.args()
    device = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda"
    )
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device
    )

    def attention(*args):
        return gpu.ragged_paged_attention(*args, sm_scale=0.1, sliding_window=64, soft_cap=30.0)

    try:
        with jax.sharding.use_abstract_mesh(mesh):
            lowered = jax.jit(attention).trace(*args).lower(lowering_platforms=("cuda",))
    except RuntimeError as error:  # a JAX without abstract-GPU lowering support
        pytest.skip(f"Triton lowering unavailable without a GPU: {error}")
    assert "xla.gpu.triton" in lowered.as_text()


# ---------------------------------------------------------------- full sweep (slow)


@pytest.mark.slow
@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block", [(1, 16), (4, 1), (16, 2), (32, 8)])
def test_batch_mixes_sweep(mix, dtype, block):
    group = 4  # 8 query heads over 2 KV heads (rpa_inputs' default)
    if block[0] * group < gpu.MIN_DOT_SIZE:
        block = (gpu.MIN_DOT_SIZE // group, block[1])
    batch = make_batch(seed_of("gpu_sweep", mix, dtype, block), MIXES[mix], dtype=dtype)
    check_kernel(batch, block=block, sm_scale=128**-0.5)


@pytest.mark.slow
@pytest.mark.parametrize("group", range(1, 9))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gqa_ratios_sweep(group, dtype):
    batch = make_batch(
        seed_of("gpu_gqa_sweep", group, dtype),
        MIXES["mixed"],
        num_q_heads=2 * group,
        num_kv_heads=2,
        head_dim=64,
        dtype=dtype,
    )
    check_kernel(batch, sm_scale=0.125)


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_dims_sweep(head_dim, dtype):
    batch = make_batch(
        seed_of("gpu_dim_sweep", head_dim, dtype), MIXES["mixed"], head_dim=head_dim, dtype=dtype
    )
    check_kernel(batch, sm_scale=head_dim**-0.5)


@pytest.mark.slow
@pytest.mark.parametrize("window", [1, 5, 16, 17, 40, 1000])
@pytest.mark.parametrize("page_size", [8, 16])
def test_sliding_window_sweep(window, page_size):
    batch = make_batch(
        seed_of("gpu_window_sweep", window, page_size), MIXES["mixed"], page_size=page_size
    )
    check_kernel(batch, block=(4, 2), sm_scale=0.1, sliding_window=window)


@pytest.mark.slow
@pytest.mark.parametrize("soft_cap", [1.0, 30.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_soft_cap_sweep(soft_cap, dtype):
    batch = make_batch(seed_of("gpu_cap_sweep", soft_cap, dtype), MIXES["mixed"], dtype=dtype)
    check_kernel(batch, sm_scale=0.5, soft_cap=soft_cap)


@pytest.mark.slow
@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_page_sizes_sweep(page_size):
    batch = make_batch(
        seed_of("gpu_page_sweep", page_size), MIXES["page_boundaries"], page_size=page_size
    )
    check_kernel(batch, block=(4, 1), sm_scale=0.1)


@pytest.mark.slow
def test_large_mixed_batch():
    """Many sequences, long contexts, pages spread over the whole cache."""
    rng = np.random.default_rng(seed_of("gpu_large"))
    seqs = [(1, int(n)) for n in rng.integers(1, 300, 24)]
    seqs += [
        (int(q), int(q) + int(c))
        for q, c in zip(rng.integers(1, 60, 6), rng.integers(0, 200, 6), strict=True)
    ]
    batch = make_batch(seed_of("gpu_large", "batch"), seqs, dtype=jnp.bfloat16, max_num_seqs=40)
    check_kernel(batch, sm_scale=128**-0.5, sliding_window=128)


@pytest.mark.parametrize(
    "setting, backend, want",
    [
        ("pallas", "gpu", "gpu-or-reference"),
        ("auto", "gpu", "gpu-or-reference"),
        ("auto", "cpu", "reference"),
        ("pallas", "cpu", "tpu"),
    ],
)
def test_plugin_selects_the_kernel_per_backend(monkeypatch, setting, backend, want):
    """On a GPU backend ``auto`` and ``pallas`` run this kernel (reference for odd shapes)."""
    from tpu_plugin.layers import attention

    monkeypatch.setenv("TPU_PLUGIN_ATTENTION", setting)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    attention.attention_kernel.cache_clear()
    try:
        chosen = attention.attention_kernel()
    finally:
        attention.attention_kernel.cache_clear()
    if want == "gpu-or-reference":
        assert chosen is attention._gpu_kernel_or_reference
        return
    chosen = getattr(chosen, "func", chosen)  # the TPU kernel comes as a functools.partial
    assert chosen.__module__.rsplit(".", 1)[-1] == want


def test_gpu_kernel_takes_power_of_two_shapes_only():
    from tpu_kernels.ragged_paged_attention import gpu

    assert gpu.supports(128, 16) and gpu.supports(64, 256)
    assert not gpu.supports(80, 16) and not gpu.supports(96, 16) and not gpu.supports(128, 24)
