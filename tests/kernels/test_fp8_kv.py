"""An fp8 (e4m3) KV cache read by every ragged paged attention implementation.

The pages hold e4m3 values (the hostile batches of ``rpa_inputs``, rounded to e4m3; NaN stays
NaN in every slot without a real key). The reference on fp8 pages must equal the definition on
the same values widened to float32, and the CPU (``xla``), TPU (interpret mode) and GPU
(interpret mode) implementations must equal the reference, within the usual bounds.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from rpa_inputs import MIXES, check_padding_rows_zero, make_batch, naive_attention, rel_err, seed_of

from tpu_kernels.ragged_paged_attention import gpu, reference, tpu, xla

FP8 = jnp.float8_e4m3fn


def fp8_batch(name: str, dtype, **kwargs):
    batch = make_batch(seed_of("fp8kv", name, dtype), MIXES["mixed"], dtype=dtype, **kwargs)
    # Round the pages to e4m3 once; args() then widens them to ``dtype`` for the definition.
    k = np.asarray(jnp.asarray(batch.k_pages, FP8).astype(jnp.float32))
    v = np.asarray(jnp.asarray(batch.v_pages, FP8).astype(jnp.float32))
    return dataclasses.replace(batch, k_pages=k, v_pages=v)


def fp8_args(batch) -> tuple:
    q, k, v, *tables = batch.args()
    return (q, jnp.asarray(batch.k_pages, FP8), jnp.asarray(batch.v_pages, FP8), *tables)


def test_write_saturates_instead_of_nan():
    pages = jnp.zeros((2, 4, 1, 8), FP8)
    new = jnp.asarray([[[1e5] * 8], [[-1e5] * 8], [[3.0] * 8]], jnp.float32)
    k, v = reference.write_kv_pages(pages, pages, new, new, jnp.asarray([0, 5, -1], jnp.int32))
    got = np.asarray(k.astype(jnp.float32))
    assert got[0, 0, 0, 0] == 448.0 and got[1, 1, 0, 0] == -448.0
    assert np.all(np.isfinite(got)) and k.dtype == FP8 and v.dtype == FP8


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_on_fp8_pages_is_the_definition(dtype):
    batch = fp8_batch("ref", dtype)
    got = reference.ragged_paged_attention(*fp8_args(batch), sm_scale=0.1)
    want = naive_attention(dataclasses.replace(batch, dtype=jnp.float32), sm_scale=0.1)
    real = batch.num_real_tokens
    assert rel_err(got, want, real) <= (1e-5 if dtype == jnp.float32 else 1e-2)
    check_padding_rows_zero(got, real)


IMPLEMENTATIONS = {
    "xla": lambda *a, **k: xla.ragged_paged_attention(*a, **k, kv_chunk=32),
    "tpu": lambda *a, **k: tpu.ragged_paged_attention(
        *a, **k, num_queries_per_block=16, num_kv_pages_per_block=2, interpret=True
    ),
    "gpu": lambda *a, **k: gpu.ragged_paged_attention(*a, **k, interpret=True),
}


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_read_fp8_pages(impl, dtype):
    batch = fp8_batch(impl, dtype)
    args = fp8_args(batch)
    kwargs = dict(sm_scale=0.1, sliding_window=48, soft_cap=20.0)
    want = reference.ragged_paged_attention(*args, **kwargs)
    got = IMPLEMENTATIONS[impl](*args, **kwargs)
    assert got.dtype == jnp.dtype(dtype)
    real = batch.num_real_tokens
    assert rel_err(got, want, real) <= (1e-5 if dtype == jnp.float32 else 1e-2)
    check_padding_rows_zero(got, real)
