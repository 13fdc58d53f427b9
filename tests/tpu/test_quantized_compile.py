"""The quantized kernels through the real TPU compiler (libtpu), for abstract v5e/v6e chips.

Shapes are Llama-3-8B's projections at decode (M = 16) and prefill (M = 512). Each compile must
contain the Mosaic kernel, and the compiler's memory analysis must show the 8-bit weight as an
8-bit argument (no dequantized copy of it anywhere: temporaries far below the bf16 weight).
TPU7x (fp8 MXU) runs in the slow tier.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tpu_kernels.quantized_matmul import tpu
from tpu_plugin.tools import tpu_aot

INT8, FP8 = jnp.int8, jnp.float8_e4m3fn


def compile_matmul(topology: str, m: int, n: int, k: int, wdtype, act):
    devices = tpu_aot.topology_devices(topology)
    mesh = Mesh(np.array(devices[:1]).reshape(1), ("x",))
    one = NamedSharding(mesh, P())
    args = [
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=one),
        jax.ShapeDtypeStruct((n, k), wdtype, sharding=one),
        jax.ShapeDtypeStruct((n,), jnp.float32, sharding=one),
    ]
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = jax.jit(lambda *a: tpu.quantized_matmul(*a, activation_dtype=act)).lower(*args)
    return lowered.compile()


def check(compiled, m: int, n: int, k: int) -> None:
    assert 'custom_call_target="tpu_custom_call"' in compiled.as_text()
    memory = compiled.memory_analysis()
    weight_bytes = n * k  # one byte a weight
    # The 8-bit weight, the bf16 activations and the scales; nothing widened.
    assert memory.argument_size_in_bytes <= weight_bytes + 2 * m * k + 4 * n
    # No bf16 copy of the weight (2 bytes a weight) among the temporaries.
    assert memory.temp_size_in_bytes < weight_bytes


@pytest.mark.parametrize("topology", ["v5e:1x1", "v6e:1x1"])
@pytest.mark.parametrize(
    "wdtype, act", [(INT8, None), (FP8, None), (INT8, INT8)], ids=["w8a16-int8", "w8a16-fp8",
                                                                   "w8a8-int8"]
)  # fmt: skip
@pytest.mark.parametrize(
    "m, n, k", [(16, 14336, 4096), (512, 4096, 14336)], ids=["decode", "prefill"]
)
def test_quantized_matmul_compiles(topology, wdtype, act, m, n, k):
    check(compile_matmul(topology, m, n, k, wdtype, act), m, n, k)


@pytest.mark.slow
@pytest.mark.parametrize("wdtype, act", [(FP8, FP8), (FP8, None)])
def test_fp8_mxu_on_tpu7x(wdtype, act):
    check(compile_matmul("TPU7x:1x1x1", 16, 14336, 4096, wdtype, act), 16, 14336, 4096)


def compile_attention(topology: str, kv_dtype, num_kv_heads: int = 8):
    from tpu_kernels.ragged_paged_attention import tpu as rpa

    devices = tpu_aot.topology_devices(topology)
    mesh = Mesh(np.array(devices[:1]).reshape(1), ("x",))
    one = NamedSharding(mesh, P())
    seqs, pages_per_seq, tokens, pages = 8, 16, 16, 128
    args = [
        jax.ShapeDtypeStruct(shape, dtype, sharding=one)
        for shape, dtype in [
            ((tokens, 32, 128), jnp.bfloat16),
            ((pages, 16, num_kv_heads, 128), kv_dtype),
            ((pages, 16, num_kv_heads, 128), kv_dtype),
            ((seqs,), jnp.int32),
            ((seqs, pages_per_seq), jnp.int32),
            ((seqs + 1,), jnp.int32),
            ((1,), jnp.int32),
        ]
    ]
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = jax.jit(lambda *a: rpa.ragged_paged_attention(*a, sm_scale=0.1)).lower(*args)
    return lowered.compile(), 2 * pages * 16 * num_kv_heads * 128


@pytest.mark.parametrize("topology", ["v5e:1x1", "v6e:1x1"])
def test_attention_reads_fp8_pages(topology):
    """The Mosaic attention kernel on e4m3 pages: compiles, and the pages are arguments of
    one byte a value (an fp8 cache is half a bf16 one in HBM, no padded layout)."""
    compiled, values = compile_attention(topology, FP8)
    assert 'custom_call_target="tpu_custom_call"' in compiled.as_text()
    memory = compiled.memory_analysis()
    queries = 16 * 32 * 128 * 2
    assert memory.argument_size_in_bytes <= values + queries + 64 * 1024


# ---------------------------------------------------------------- the whole engine, quantized

# a compressed-tensors config.json entry as llm-compressor writes it (W8A8 INT8): the one of
# the planner's example config, which benchmarks/bench_quantized.py writes too
INT8_W8A8 = json.loads(
    (Path(__file__).parents[2] / "examples/plan_configs/llama-3-8b-int8-w8a8.json").read_text()
)["quantization_config"]


def llama_dir(tmp_path_factory, quantization_config: dict | None):
    """config.json only (the planner needs no weights): a small Llama with TPU-shaped rows."""
    from transformers import LlamaConfig

    from tests.conftest import SMALL

    config = LlamaConfig(**{**SMALL, "hidden_size": 512, "intermediate_size": 1024})
    config.architectures = ["LlamaForCausalLM"]
    if quantization_config:
        config.quantization_config = quantization_config
    out = tmp_path_factory.mktemp("quantized-llama")
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    return str(out)


@pytest.mark.slow  # 45 s on 2 cores: the default suite's budget goes to the CPU serving test
@pytest.mark.parametrize("quant", ["compressed-tensors-int8-w8a8", "fp8"])
def test_quantized_engine_compiles_for_v6e(tmp_path_factory, quant):
    """Every program a quantized engine with an fp8 KV cache precompiles, through libtpu for
    v6e: the quantized forwards carry the Mosaic matmul of every linear layer (7 per decoder
    layer, 2 layers) besides the attention kernels, the weights are a byte each (the planner
    counts the abstract parameters serving loads) and the e4m3 pages hold twice the tokens."""
    from tests.tpu.test_tpu_compile import ENGINE, check_all_compiled
    from tpu_plugin.tools import plan as planner

    # A small KV budget (~60 MB): a large per-layer e4m3 page array (seen from 130k pages of
    # 16 x 2 x 128, 0.5 GB) makes the TPU compiler copy the whole cache on every write, which
    # bf16 pages do not (README, "Quantized serving": open). Here the write stays in place:
    # the peak is the arguments plus small temporaries.
    engine = {**ENGINE, "gpu_memory_utilization": 0.002}
    plain = planner.plan(
        tpu_aot.EngineOptions(model=llama_dir(tmp_path_factory, None), **engine),
        "v6e:1x1",
        subset="estimate",
    )
    if quant == "fp8":
        model, method = llama_dir(tmp_path_factory, None), "fp8"
    else:
        model, method = llama_dir(tmp_path_factory, INT8_W8A8), None
    options = tpu_aot.EngineOptions(
        model=model, quantization=method, kv_cache_dtype="fp8", **engine
    )
    result = planner.plan(options, "v6e:1x1")
    check_all_compiled(result, 2 + 2 * 7)
    # 2 layers' linear weights (4.2M values) go from 2 bytes to 1; embeddings stay bf16.
    linear = 2 * (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1024)
    assert result.weight_bytes <= plain.weight_bytes - 0.95 * linear
    assert result.kv_blocks >= 1.9 * plain.kv_blocks
    for c in result.compiled:
        if c.program.kind == "forward":  # no copy of the cache, no widened weight
            assert c.peak_bytes <= result.weight_bytes + result.kv_bytes + 16 * 2**20
