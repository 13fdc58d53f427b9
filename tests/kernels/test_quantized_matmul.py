"""The quantized matmul: the reference against a float64 NumPy definition, and the TPU (TPU
interpret mode) and GPU (Pallas interpret mode) kernels against the reference.

Relative error is max|got - want| / max|want|: fp32 within 1e-5, bf16 within 1e-2. Each case
draws fresh inputs seeded by its parameters. Lowering checks run Pallas' Mosaic and Triton
lowerings on CPU for abstract devices; the real TPU compiler runs in ``tests/tpu``.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpu_kernels.quantized_matmul import gpu, reference, tpu

INT8, FP8 = jnp.int8, jnp.float8_e4m3fn


def seed_of(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def tol_of(dtype) -> float:
    return 1e-5 if jnp.dtype(dtype) == jnp.float32 else 1e-2


def problem(seed: int, m: int, n: int, k: int, wdtype, xdtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), xdtype)
    # Rows of very different magnitudes: a per-row scale must follow each.
    w = rng.standard_normal((n, k)) * np.exp(rng.uniform(-3, 3, (n, 1)))
    q, scale = reference.quantize_per_channel(jnp.asarray(w, jnp.float32), wdtype)
    return x, q, scale


# ---------------------------------------------------------------- reference vs definition


def numpy_matmul(x, q, scale, activation_dtype=None):
    """The definition in float64: dequantize, (quantize activations), multiply."""
    x = np.asarray(x.astype(jnp.float32), np.float64)
    w = np.asarray(q.astype(jnp.float32), np.float64) * np.asarray(scale, np.float64)[:, None]
    if activation_dtype is not None:
        xq, xs = reference.quantize_activations(jnp.asarray(x, jnp.float32), activation_dtype)
        x = np.asarray(xq.astype(jnp.float32), np.float64) * np.asarray(xs, np.float64)[:, None]
    return x @ w.T


@pytest.mark.parametrize("wdtype", [INT8, FP8])
@pytest.mark.parametrize("w8a8", [False, True])
def test_reference_matches_definition(wdtype, w8a8):
    x, q, scale = problem(seed_of("def", wdtype, w8a8), 7, 48, 96, wdtype)
    act = wdtype if w8a8 else None
    got = reference.quantized_matmul(x, q, scale, activation_dtype=act)
    assert got.dtype == x.dtype and got.shape == (7, 48)
    assert rel_err(got, numpy_matmul(x, q, scale, act)) <= 1e-6


@pytest.mark.parametrize("wdtype", [INT8, FP8])
def test_quantization_error_is_bounded(wdtype):
    """Per-row scales: the dequantized weight is within half a step (int8) or 2^-4 relative
    (e4m3's 3 mantissa bits) of the original, row by row."""
    rng = np.random.default_rng(seed_of("qerr", wdtype))
    w = rng.standard_normal((32, 256)) * np.exp(rng.uniform(-4, 4, (32, 1)))
    q, scale = reference.quantize_per_channel(jnp.asarray(w, jnp.float32), wdtype)
    back = np.asarray(reference.dequantize(q, scale))
    err = np.abs(back - w)
    if wdtype == INT8:
        assert np.all(err <= 0.5 * np.asarray(scale)[:, None] * (1 + 1e-5))
    else:  # relative for normal values; absolute half of the smallest subnormal step below
        bound = np.maximum(np.abs(w) * 2.0**-4, np.asarray(scale)[:, None] * 2.0**-10)
        assert np.all(err <= bound * (1 + 1e-5))
    assert np.all(np.abs(q.astype(jnp.float32)) <= reference.qmax(wdtype))


def test_saturation_never_gives_nan():
    """A value past e4m3's range saturates to +-448 (a plain cast would give NaN)."""
    got = reference.to_quantized(jnp.asarray([1e6, -1e6, 3.0]), FP8)
    assert np.asarray(got.astype(jnp.float32)).tolist() == [448.0, -448.0, 3.0]


def test_static_activation_scale():
    x, q, scale = problem(seed_of("static"), 4, 32, 64, FP8)
    xs = jnp.float32(0.05)
    got = reference.quantized_matmul(x, q, scale, activation_dtype=FP8, x_scale=xs)
    xq = np.clip(np.asarray(x) / 0.05, -448, 448).astype(jnp.float8_e4m3fn).astype(np.float64)
    want = (xq * 0.05) @ np.asarray(reference.dequantize(q, scale), np.float64).T
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("zero", [False, True])
def test_int4_reference_matches_definition(zero):
    rng = np.random.default_rng(seed_of("int4", zero))
    n, k, g = 24, 128, 32
    values = rng.integers(0, 16, (n, k)) if zero else rng.integers(-8, 8, (n, k))
    w = jnp.asarray(values, jnp.uint4 if zero else jnp.int4)
    scale = jnp.asarray(rng.uniform(0.01, 0.1, (n, k // g)), jnp.float32)
    zeros = jnp.asarray(rng.integers(0, 16, (n, k // g)), jnp.uint4) if zero else None
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.float32)
    got = reference.int4_matmul(x, w, scale, zeros, group_size=g)
    z = np.repeat(np.asarray(zeros, np.float64), g, axis=1) if zero else 0.0
    dense = (values - z) * np.repeat(np.asarray(scale, np.float64), g, axis=1)
    assert rel_err(got, np.asarray(x, np.float64) @ dense.T) <= 1e-6


def test_argument_checks_name_the_problem():
    x, q, scale = problem(1, 2, 16, 32, INT8)
    with pytest.raises(ValueError, match="w_scale must be"):
        reference.quantized_matmul(x, q, scale[:3])
    with pytest.raises(ValueError, match="one type"):
        reference.quantized_matmul(x, q, scale, activation_dtype=FP8)
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn"):
        reference.quantized_matmul(x, q.astype(jnp.bfloat16), scale)


# ---------------------------------------------------------------- kernels vs reference

CASES = [
    # (m, n, k, weight dtype, x dtype, W8A8); the default tier runs a third (interpret mode
    # costs seconds a case), every case runs with -m slow
    (1, 256, 512, INT8, jnp.float32, False),
    pytest.param(5, 384, 256, FP8, jnp.float32, False, marks=pytest.mark.slow),
    pytest.param(32, 256, 384, INT8, jnp.bfloat16, False, marks=pytest.mark.slow),
    (3, 128, 256, FP8, jnp.bfloat16, False),
    pytest.param(40, 256, 256, INT8, jnp.float32, True, marks=pytest.mark.slow),
    (9, 128, 512, FP8, jnp.bfloat16, True),
]


def check(got, x, q, scale, act):
    want = reference.quantized_matmul(x, q, scale, activation_dtype=act)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got.astype(jnp.float32), want.astype(jnp.float32)) <= tol_of(x.dtype)


@pytest.mark.parametrize("m, n, k, wdtype, xdtype, w8a8", CASES)
def test_tpu_kernel_matches_reference(m, n, k, wdtype, xdtype, w8a8):
    x, q, scale = problem(seed_of("tpu", m, n, k, wdtype, xdtype, w8a8), m, n, k, wdtype, xdtype)
    act = wdtype if w8a8 else None
    # Small blocks: several steps on every grid axis, so accumulation and the last-step
    # rescale are exercised.
    got = tpu.quantized_matmul(
        x, q, scale, activation_dtype=act, block_m=32, block_n=128, block_k=128, interpret=True
    )
    check(got, x, q, scale, act)


def test_tpu_kernel_default_blocks():
    x, q, scale = problem(seed_of("tpu_default"), 17, 1024, 2048, INT8, jnp.bfloat16)
    check(tpu.quantized_matmul(x, q, scale, interpret=True), x, q, scale, None)


@pytest.mark.parametrize("m, n, k, wdtype, xdtype, w8a8", CASES)
def test_gpu_kernel_matches_reference(m, n, k, wdtype, xdtype, w8a8):
    x, q, scale = problem(seed_of("gpu", m, n, k, wdtype, xdtype, w8a8), m, n, k, wdtype, xdtype)
    act = wdtype if w8a8 else None
    config = gpu.Config(block_m=16, block_n=64, block_k=32, splits=2)
    got = gpu.quantized_matmul(x, q, scale, activation_dtype=act, config=config, interpret=True)
    check(got, x, q, scale, act)


def test_gpu_default_config_splits_decode():
    """Decode shapes of Llama-3-8B get 16-row tiles and a split contraction; prefill none."""
    down = gpu.default_config(1, 4096, 14336)
    assert down.block_m == 16 and down.splits > 1
    assert (4096 // down.block_n) * down.splits <= gpu.TARGET_PROGRAMS
    assert gpu.default_config(512, 4096, 14336).splits == 1
    x, q, scale = problem(seed_of("gpu_default"), 2, 256, 1024, FP8, jnp.bfloat16)
    check(gpu.quantized_matmul(x, q, scale, interpret=True), x, q, scale, None)


def test_gpu_kernel_refuses_shapes_it_cannot_tile():
    x, q, scale = problem(2, 2, 96, 100, INT8)
    assert not gpu.supports(96, 100)
    with pytest.raises(ValueError, match="power-of-two tiles"):
        gpu.quantized_matmul(x, q, scale, interpret=True)


def test_tpu_w8a8_needs_a_multiplying_mxu():
    assert tpu.mxu_multiplies(INT8, "TPU v5 lite") and tpu.mxu_multiplies(INT8, "TPU v6 lite")
    assert not tpu.mxu_multiplies(FP8, "TPU v6 lite")
    assert tpu.mxu_multiplies(FP8, "TPU7x")
    x, q, scale = problem(3, 8, 128, 128, FP8)
    with pytest.raises(ValueError, match="weight-only form"):
        tpu.quantized_matmul(x, q, scale, activation_dtype=FP8)  # this host has no TPU


def _abstract_mesh(kind: str, platform: str):
    device = jax.sharding.AbstractDevice(
        device_kind=kind, num_cores=1 if platform == "tpu" else None, platform=platform
    )
    return jax.sharding.AbstractMesh(
        (1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device
    )


@pytest.mark.parametrize(
    "kind, wdtype, act", [("TPU v5 lite", INT8, None), ("TPU v6 lite", INT8, INT8),
                          ("TPU v6 lite", FP8, None)]
)  # fmt: skip
def test_tpu_kernel_lowers_to_mosaic(kind, wdtype, act):
    x, q, scale = problem(4, 16, 512, 1024, wdtype, jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(_abstract_mesh(kind, "tpu")):
        lowered = (
            jax.jit(lambda *a: tpu.quantized_matmul(*a, activation_dtype=act))
            .trace(x, q, scale)
            .lower(lowering_platforms=("tpu",))
        )
    assert "tpu_custom_call" in lowered.as_text()


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("wdtype, act", [(INT8, None), (FP8, None), (FP8, FP8), (INT8, INT8)])
def test_gpu_kernel_lowers_to_triton(wdtype, act):
    """Every op has a Triton lowering rule (for an abstract H100; Triton's PTX compiler needs
    a GPU build of jaxlib and runs on the lent GPU, ``benchmarks/bench_quant.py``)."""
    x, q, scale = problem(5, 4, 4096, 1024, wdtype, jnp.bfloat16)
    try:
        with jax.sharding.use_abstract_mesh(_abstract_mesh("NVIDIA H100 80GB HBM3", "cuda")):
            lowered = (
                jax.jit(lambda *a: gpu.quantized_matmul(*a, activation_dtype=act))
                .trace(x, q, scale)
                .lower(lowering_platforms=("cuda",))
            )
    except RuntimeError as error:  # a JAX without abstract-GPU lowering support
        pytest.skip(f"Triton lowering unavailable without a GPU: {error}")
    assert "xla.gpu.triton" in lowered.as_text()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (the lent H200)")
@pytest.mark.parametrize("wdtype, act", [(INT8, None), (FP8, None), (FP8, FP8), (INT8, INT8)])
@pytest.mark.parametrize("m", [1, 32, 256])
def test_gpu_kernel_on_device(m, wdtype, act):
    """The compiled Triton kernel on a real GPU, Llama-3-8B's down projection shape."""
    x, q, scale = problem(seed_of("device", m, wdtype, act), m, 4096, 14336, wdtype, jnp.bfloat16)
    check(gpu.quantized_matmul(x, q, scale, activation_dtype=act), x, q, scale, act)
