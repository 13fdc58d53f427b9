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

import functools
import inspect

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


def check_kernel(batch, *, block=(None, None), num_kv_splits=None, **kwargs):
    """Runs kernel (interpret mode) and reference on ``batch`` and checks the kernel's numbers."""
    want = reference_attention(batch, **kwargs)
    block_q, pages = block
    got = gpu.ragged_paged_attention(
        *batch.args(),
        **kwargs,
        block_q=block_q,
        num_kv_pages_per_block=pages,
        num_kv_splits=num_kv_splits,
        interpret=True,
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


# ---------------------------------------------------------------- split-KV

# Ragged lengths over a wide page table: a 1-key decode has one KV block, so with 2 or 4 splits
# some programs get an empty run; prefill chunks and decodes share the call.
SPLIT_SEQS = [(1, 1), (1, 17), (1, 200), (3, 90), (20, 50), (1, 64), (9, 9)]


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_split_kv(splits):
    batch = make_batch(seed_of("gpu_split", splits), SPLIT_SEQS, pages_per_seq=16)
    check_kernel(batch, block=(4, 1), num_kv_splits=splits, sm_scale=0.1)


@pytest.mark.parametrize(
    "splits, window, soft_cap, dtype",
    [(2, 40, None, jnp.float32), (4, 5, 5.0, jnp.bfloat16), (3, None, 30.0, jnp.float32)],
)
def test_split_kv_window_and_soft_cap(splits, window, soft_cap, dtype):
    """A window can leave a split nothing to see, and 3 splits do not divide the blocks."""
    batch = make_batch(seed_of("gpu_split_w", splits, window), SPLIT_SEQS, dtype=dtype)
    check_kernel(
        batch,
        block=(4, 1),
        num_kv_splits=splits,
        sm_scale=0.2,
        sliding_window=window,
        soft_cap=soft_cap,
    )


def test_decode_defaults_split():
    """A decode-shaped call (tokens <= sequence slots) with a long page table takes the 16-row
    tile and several splits by default, and still matches the reference."""
    seqs = [(1, 1), (1, 150), (1, 33), (1, 256)]
    batch = make_batch(
        seed_of("gpu_decode_default"), seqs, max_num_seqs=8, num_tokens=6, pages_per_seq=32
    )
    assert gpu.default_block_sizes(4, 16, decode=True) == (4, 4)
    splits = gpu.default_num_kv_splits(
        num_tokens=6, max_num_seqs=8, num_kv_heads=2, block_q=4, kv_blocks_per_seq=8
    )
    assert splits == 2
    check_kernel(batch, sm_scale=128**-0.5)


def test_default_num_kv_splits():
    """Few query blocks and a long page table split; prefill-heavy shapes and short tables not."""
    decode = dict(num_tokens=64, max_num_seqs=64, num_kv_heads=8, block_q=4)
    assert gpu.default_num_kv_splits(**decode, kv_blocks_per_seq=32) == 8
    assert gpu.default_num_kv_splits(**decode, kv_blocks_per_seq=128) == 8
    assert gpu.default_num_kv_splits(**decode, kv_blocks_per_seq=4) == 1  # too short to split
    assert gpu.default_num_kv_splits(**{**decode, "num_tokens": 1}, kv_blocks_per_seq=512) == 16
    prefill = dict(num_tokens=8192, max_num_seqs=256, num_kv_heads=8, block_q=16)
    assert gpu.default_num_kv_splits(**prefill, kv_blocks_per_seq=512) == 1


def test_merge_splits_is_exact():
    """Softmax over all keys == merge of per-split partials (empty splits included)."""
    rng = np.random.default_rng(seed_of("gpu_merge"))
    scores = rng.standard_normal((3, 40)) * 5
    values = rng.standard_normal((40, 8))
    bounds = [0, 0, 13, 14, 40]  # split 0 is empty
    m, denom, acc = [], [], []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        s = scores[:, lo:hi]
        top = s.max(axis=1) if hi > lo else np.full(3, -1e30)
        p = np.exp(s - top[:, None])
        m.append(top)
        denom.append(p.sum(axis=1))
        acc.append(p @ values[lo:hi])
    got = gpu.merge_splits(*(jnp.asarray(np.stack(x), jnp.float32) for x in (m, denom, acc)))
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    want = weights @ values / weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # No split saw a key: zero, not NaN.
    empty = gpu.merge_splits(
        jnp.full((2, 1), -1e30), jnp.zeros((2, 1)), jnp.zeros((2, 1, 4), jnp.float32)
    )
    np.testing.assert_array_equal(np.asarray(empty), 0.0)


def test_rejects_zero_splits():
    batch = make_batch(seed_of("gpu_zero_split"), [(2, 5)])
    with pytest.raises(ValueError, match="num_kv_splits must be at least 1"):
        gpu.ragged_paged_attention(*batch.args(), sm_scale=0.1, num_kv_splits=0, interpret=True)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("window", "sliding_window must be a positive number of keys"),
        ("heads", "6 query heads do not group over 4 KV heads"),
        ("v_pages", "k_pages and v_pages must both be"),
        ("kv_lens", "kv_lens must be \\[max_num_seqs\\]"),
        ("head_dim", "queries have head_dim 64 but the KV pages 128"),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "tpu", "gpu"])
def test_shared_argument_checks(impl, bad, message):
    """Reference, TPU and GPU kernels reject bad calls alike (``validation.check_arguments``)."""
    from tpu_kernels.ragged_paged_attention import reference, tpu

    heads = (6, 4) if bad == "heads" else (8, 2)
    batch = make_batch(seed_of("bad_args"), [(2, 5)], num_q_heads=heads[0], num_kv_heads=heads[1])
    args = list(batch.args())
    if bad == "v_pages":
        args[2] = args[2][:, :8]
    elif bad == "kv_lens":
        args[3] = args[3][:-1]
    elif bad == "head_dim":
        args[0] = args[0][..., :64]
    kwargs = dict(sm_scale=0.1, sliding_window=0 if bad == "window" else None)
    fn = {
        "reference": reference.ragged_paged_attention,
        "tpu": functools.partial(tpu.ragged_paged_attention, interpret=True),
        "gpu": functools.partial(gpu.ragged_paged_attention, interpret=True),
    }[impl]
    with pytest.raises(ValueError, match=message):
        fn(*args, **kwargs)


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
@pytest.mark.parametrize(
    "dtype, group, splits", [(jnp.float32, 1, 1), (jnp.bfloat16, 3, 1), (jnp.bfloat16, 4, 4)]
)
def test_lowers_to_triton(dtype, group, splits):
    """Interpret mode accepts any jnp; this checks that every op has a Triton lowering rule.

    It runs Pallas' Triton lowering on CPU for an abstract H100. Triton's compiler (TTIR to
    PTX) needs a GPU build of jaxlib and is not exercised here.
    """
    batch = make_batch(
        seed_of("gpu_lower", dtype, group, splits),
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
        return gpu.ragged_paged_attention(
            *args, sm_scale=0.1, sliding_window=64, soft_cap=30.0, num_kv_splits=splits
        )

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


@pytest.mark.slow
@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("window", [None, 7])
def test_split_kv_sweep(mix, splits, window):
    batch = make_batch(
        seed_of("gpu_split_sweep", mix, splits, window), MIXES[mix], dtype=jnp.bfloat16
    )
    check_kernel(batch, block=(4, 1), num_kv_splits=splits, sm_scale=0.1, sliding_window=window)


@pytest.mark.slow
@pytest.mark.parametrize("num_seqs", [1, 5, 12])
def test_decode_defaults_sweep(num_seqs):
    """Decode-shaped calls with default tiles and splits, ragged lengths, wide page tables."""
    rng = np.random.default_rng(seed_of("gpu_decode_sweep", num_seqs))
    seqs = [(1, int(n)) for n in rng.integers(1, 400, num_seqs)]
    batch = make_batch(
        seed_of("gpu_decode_sweep", "batch", num_seqs),
        seqs,
        dtype=jnp.bfloat16,
        max_num_seqs=16,
        num_tokens=16,
        pages_per_seq=32,
    )
    check_kernel(batch, sm_scale=128**-0.5, soft_cap=30.0)


@pytest.mark.parametrize(
    "setting, backend, want",
    [
        ("pallas", "gpu", "gpu-or-reference"),
        ("auto", "gpu", "gpu-or-reference"),
        ("auto", "cpu", "xla"),
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
    # The TPU kernel comes as a functools.partial inside the per-device (shard_map) wrapper.
    chosen = inspect.unwrap(chosen)
    chosen = getattr(chosen, "func", chosen)
    assert chosen.__module__.rsplit(".", 1)[-1] == want


def test_gpu_kernel_takes_power_of_two_shapes_only():
    from tpu_kernels.ragged_paged_attention import gpu

    assert gpu.supports(128, 16) and gpu.supports(64, 256)
    assert not gpu.supports(80, 16) and not gpu.supports(96, 16) and not gpu.supports(128, 24)
