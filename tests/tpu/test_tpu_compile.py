"""The engine's programs through the real TPU compiler (libtpu), for abstract TPU topologies.

Every program start-up precompiles (``compile.step_buckets`` forwards, every sampler variant,
the async token recorder) is built by ``tpu_plugin.tools.tpu_aot`` from the runner itself and
compiled for v5e and v6e with the Mosaic (Pallas TPU) kernels, never interpret mode; the
planner's report is checked on the same compiles. Slow tier: v5p and TPU7x, and the attention
kernel's tuning-table block sizes of every generation the table names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import (
    BertConfig,
    DeepseekV3Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from tests.conftest import SMALL
from tpu_plugin.models.registry import supported_architectures
from tpu_plugin.tools import plan as planner
from tpu_plugin.tools import tpu_aot, tpu_specs

# Small engine: 4 forward buckets, 2 sequence buckets; enough to hit every kind of program.
ENGINE = dict(max_model_len=128, max_num_seqs=2, max_num_batched_tokens=8)

# Small models, but with TPU-shaped KV rows: head_dim 128. A K/V page row narrower than the
# 128 lanes is laid out by the compiler in an order of its own and every update then copies
# the whole cache (README, "Will it fit?"), which the real models do not do. MLA's latent +
# rope (64 + 32) is not a multiple of 128 either, as DeepSeek-V3's 576 is not: its pages
# are stored in whole 128-lane rows (mla.page_row_width), which this checks.
WIDE = {**SMALL, "hidden_size": 512}  # 4 heads of 128
CONFIGS = {
    "LlamaForCausalLM": lambda: LlamaConfig(**WIDE),
    "Qwen2ForCausalLM": lambda: Qwen2Config(**WIDE),
    "Qwen3ForCausalLM": lambda: Qwen3Config(**SMALL, head_dim=128),
    "Gemma3ForCausalLM": lambda: Gemma3TextConfig(**SMALL, head_dim=128, sliding_window=64),
    "MistralForCausalLM": lambda: MistralConfig(**WIDE, sliding_window=64),
    "Phi3ForCausalLM": lambda: Phi3Config(**WIDE, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "MixtralForCausalLM": lambda: MixtralConfig(**WIDE, num_local_experts=4),
    "Qwen3MoeForCausalLM": lambda: Qwen3MoeConfig(
        **{**SMALL, "num_attention_heads": 8, "num_key_value_heads": 4},
        head_dim=128,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "DeepseekV3ForCausalLM": lambda: DeepseekV3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        q_lora_rank=48,
        kv_lora_rank=64,
        qk_rope_head_dim=32,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=512,
    ),
}
# Pooling models (--runner pooling): their forwards return pooled rows. The decoders are
# the generative ports without lm_head; the BERT family is the encoder port, whose
# bidirectional attention is plain XLA over the step's own keys (no Mosaic kernel).
ENCODER = dict(
    vocab_size=512,
    hidden_size=512,  # 4 heads of 128
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=130,  # 128 positions after RoBERTa's padding offset
    pad_token_id=1,
    position_embedding_type="absolute",  # vLLM reads it; transformers 5 drops the default
)
POOLING = {
    "LlamaModel": lambda: LlamaConfig(**WIDE),
    "MistralModel": lambda: MistralConfig(**WIDE, sliding_window=64),
    "Qwen2Model": lambda: Qwen2Config(**WIDE),
    "BertModel": lambda: BertConfig(**ENCODER, type_vocab_size=2),
    "RobertaModel": lambda: RobertaConfig(**ENCODER, type_vocab_size=1),
    "XLMRobertaModel": lambda: XLMRobertaConfig(**ENCODER, type_vocab_size=1),
}
CONFIGS |= POOLING
ENCODERS = ("BertModel", "RobertaModel", "XLMRobertaModel")
# Pallas TPU kernels per forward: ragged paged attention per layer (2 layers), plus the two
# fused-MoE kernels per MoE layer; DeepSeek-V3's MLA attention is plain XLA (3 layers, the
# first dense).
MOSAIC_PER_FORWARD = (
    {arch: 2 for arch in CONFIGS}
    | {
        "MixtralForCausalLM": 6,
        "Qwen3MoeForCausalLM": 6,
        "DeepseekV3ForCausalLM": 4,
    }
    | dict.fromkeys(ENCODERS, 0)
)
# The default tier (minutes on 2 cores): one dense, one MoE, one MLA family and the encoder
# (pooling), each on one generation, so that the attention and fused-MoE kernels compile for
# both v5e (here) and v6e (the TP + EP test below). Every other (architecture, generation)
# pair runs in CI's tpu-compile checks (.buildkite/models.yaml) and with -m slow.
DEFAULT_TIER = {
    ("LlamaForCausalLM", "v5e:1x1"),
    ("Qwen3MoeForCausalLM", "v5e:1x1"),
    ("DeepseekV3ForCausalLM", "v6e:1x1"),
    ("BertModel", "v6e:1x1"),
}
TOPOLOGIES = ("v5e:1x1", "v6e:1x1")


def architectures() -> list:
    return [
        (arch, topology)
        if (arch, topology) in DEFAULT_TIER
        else pytest.param(arch, topology, marks=pytest.mark.slow)
        for arch in supported_architectures()
        for topology in TOPOLOGIES
    ]


def test_every_registered_architecture_has_a_config():
    assert sorted(CONFIGS) == supported_architectures()


def config_dir(tmp_path_factory: pytest.TempPathFactory, arch: str) -> Path:
    """A directory holding only the model's config.json: the planner needs no weights."""
    out = tmp_path_factory.mktemp(f"tpu-{arch}")
    config = CONFIGS[arch]()
    config.architectures = [arch]
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    return out


def engine_options(model: Path, arch: str) -> tpu_aot.EngineOptions:
    """The test engine; pooling architectures run as vLLM's pooling runner. An encoder's
    input arrives in one step (no chunked prefill), so a step holds ``max_model_len``."""
    engine = ENGINE | (
        dict(max_model_len=16, max_num_batched_tokens=16) if arch in ENCODERS else {}
    )
    runner = "pooling" if arch in POOLING else None
    return tpu_aot.EngineOptions(model=str(model), runner=runner, **engine)


def check_all_compiled(result: planner.PlanResult, mosaic_per_forward: int) -> None:
    """Every program start-up compiles compiled, with the Mosaic kernels, and fits."""
    failed = [(c.program.label, c.error) for c in result.compiled if c.error is not None]
    assert not failed, failed
    assert len(result.compiled) == result.total_programs
    kinds = {c.program.kind for c in result.compiled}
    pooling = result.options.runner == "pooling"  # forwards only: pooling samples nothing
    assert kinds == ({"forward"} if pooling else {"forward", "sampler", "record"})
    for c in result.compiled:
        if c.program.kind == "forward":
            assert c.mosaic_calls >= mosaic_per_forward, (c.program.label, c.mosaic_calls)
            assert c.peak_bytes >= result.weight_bytes + result.kv_bytes
            # No copy of the KV pages (one layer's K alone is a quarter of them): these
            # engines' steps read a few pages, and their temporaries are activations.
            assert c.temp_bytes < 0.1 * result.kv_bytes, (c.program.label, c.temp_bytes)
            assert c.bytes_accessed < result.weight_bytes + 0.1 * result.kv_bytes, c.program.label
    assert result.fits and result.kv_tokens > 0


@pytest.mark.parametrize("arch, topology", architectures())
def test_every_precompiled_program_compiles(tmp_path_factory, arch, topology):
    model = config_dir(tmp_path_factory, arch)
    result = planner.plan(engine_options(model, arch), topology)
    check_all_compiled(result, MOSAIC_PER_FORWARD[arch])
    # One chip of the generation, with its documented HBM; the KV pages take the rest.
    assert result.devices == 1
    assert result.spec.chip.name == topology.split(":")[0]
    budget = result.spec.hbm_bytes * 0.9 - result.weight_bytes
    assert 0.9 * budget <= result.kv_bytes <= budget
    if arch in POOLING:  # prefill steps only: no decode estimate
        assert not result.estimates
        return
    # The batch-1 decode estimate: XLA counts megabytes here (the tiny models' weights, the
    # pages read and per-op overheads); a copy of the KV pages would be gigabytes.
    (one,) = result.estimates
    assert one.batch == 1 and one.hand_bytes > result.weight_bytes
    assert one.bytes_moved < 0.01 * result.kv_bytes, (one.bytes_moved, one.hand_bytes)
    report = planner.format_report(result)
    assert "DOES NOT FIT" not in report and "| 1 |" in report


@pytest.mark.slow  # ~220 s on the shared 2 cores (twice the forward programs)
def test_lora_programs_compile_for_tpu(tmp_path_factory):
    """``--enable-lora``: every bucket's forward also in its LoRA variant (adapter slots in
    the parameters, each token's slot an input), compiled by libtpu like the base ones."""
    model = config_dir(tmp_path_factory, "LlamaForCausalLM")
    lora = dict(enable_lora=True, max_loras=4, max_lora_rank=16)
    base = planner.plan(tpu_aot.EngineOptions(model=str(model), **ENGINE), "v6e:1x1",
                        subset="estimate")  # fmt: skip
    result = planner.plan(tpu_aot.EngineOptions(model=str(model), **ENGINE, **lora), "v6e:1x1")
    check_all_compiled(result, MOSAIC_PER_FORWARD["LlamaForCausalLM"])
    forwards = [c for c in result.compiled if c.program.kind == "forward"]
    adapted = [c for c in forwards if c.program.label.endswith(" lora")]
    assert len(adapted) == len(forwards) // 2 > 0
    # The slots: 4 adapters x rank 16, A [r, in] and B [out, r] of q, k, v, o, gate, up and
    # down in each of 2 layers, bf16 (hidden 512, KV 2 heads x 128, intermediate 128).
    sizes = [(512, 512), (512, 256), (512, 256), (512, 512), (512, 128), (512, 128), (128, 512)]
    per_layer = sum(16 * (fan_in + fan_out) for fan_in, fan_out in sizes)
    assert result.weight_bytes - base.weight_bytes == 4 * 2 * 2 * per_layer  # slots, layers, bf16


def test_tensor_and_expert_parallel_on_v6e_2x2(tmp_path_factory):
    """TP = 4 with expert parallelism: attention and the fused-MoE kernel run per device
    (shard_map), each device holds a quarter of the weights and 2 of the 8 experts."""
    model = config_dir(tmp_path_factory, "Qwen3MoeForCausalLM")
    single = planner.plan(tpu_aot.EngineOptions(model=str(model), **ENGINE), "v6e:1x1",
                          subset="estimate")  # fmt: skip
    options = tpu_aot.EngineOptions(
        model=str(model), tensor_parallel_size=4, enable_expert_parallel=True, **ENGINE
    )
    result = planner.plan(options, "v6e:2x2")
    check_all_compiled(result, 6)
    assert result.devices == 4
    # The replicated norms, routers and rotary tables keep it from exactly 1/4.
    assert single.weight_bytes / 4 <= result.weight_bytes < single.weight_bytes / 3
    # KV heads (4) split over 4 devices: every device holds a quarter of every page, so the
    # same HBM budget holds about 4x the pages.
    assert result.kv_blocks > 3 * single.kv_blocks


@pytest.mark.slow  # ~80 s here: two offloaded forwards through libtpu
def test_moe_offload_step_compiles_for_v6e(tmp_path_factory, monkeypatch):
    """MoE offload (``predict``, 3 slots per MoE layer: 6 of 16 experts) through the real
    TPU compiler: the largest forward (a prefill, whose layers may overflow into passes) and
    the decode forward compile with the fused-MoE Mosaic kernel over the cache; the planner
    counts the expert cache with the weights and reports the routed experts in host memory."""
    monkeypatch.setenv("TPU_PLUGIN_MOE_OFFLOAD", "predict")
    monkeypatch.setenv("TPU_PLUGIN_MOE_OFFLOAD_CACHE", "3")
    model = config_dir(tmp_path_factory, "Qwen3MoeForCausalLM")
    options = tpu_aot.EngineOptions(model=str(model), **ENGINE)
    result = planner.plan(options, "v6e:1x1", subset="estimate", batches=(1,))
    failed = [(c.program.label, c.error) for c in result.failed]
    assert not failed, failed
    forwards = [c for c in result.compiled if c.program.kind == "forward"]
    assert len(forwards) >= 2 and all(c.mosaic_calls >= 2 for c in forwards)
    config = CONFIGS["Qwen3MoeForCausalLM"]()
    expert = 3 * config.moe_intermediate_size * config.hidden_size * 2  # bf16
    assert result.host_bytes == config.num_hidden_layers * config.num_experts * expert
    assert result.fits
    assert "routed experts in host memory" in planner.format_report(result)


def test_too_many_devices_names_the_numbers(tmp_path_factory):
    model = config_dir(tmp_path_factory, "LlamaForCausalLM")
    options = tpu_aot.EngineOptions(model=str(model), tensor_parallel_size=2, **ENGINE)
    with pytest.raises(ValueError, match="needs 2 devices; v6e:1x1 has 1"):
        planner.plan(options, "v6e:1x1")


def test_auto_choices_follow_the_compile_target(monkeypatch):
    """``auto`` kernels, the sampler's run-time flags and the page-table buckets are the
    TPU's while the planner compiles for one (``envs.compile_for``), the host's after."""
    from tpu_kernels.fused_moe import xla as moe_xla
    from tpu_plugin import envs
    from tpu_plugin.layers.attention import attention_kernel, page_table_width_bucketed
    from tpu_plugin.layers.moe import moe_kernel
    from tpu_plugin.runner.compile import runtime_sampler_flags

    monkeypatch.delenv("TPU_PLUGIN_ATTENTION", raising=False)
    monkeypatch.delenv("TPU_PLUGIN_MOE", raising=False)

    def choices() -> tuple:
        attention_kernel.cache_clear()
        moe_kernel.cache_clear()
        moe = moe_kernel() is moe_xla.fused_moe
        return envs.target_platform(), runtime_sampler_flags(), page_table_width_bucketed(), moe

    try:
        assert choices() == ("cpu", True, False, True)
        with envs.compile_for("tpu"):
            assert choices() == ("tpu", False, True, False)
        assert choices() == ("cpu", True, False, True)
    finally:
        attention_kernel.cache_clear()
        moe_kernel.cache_clear()


def test_device_figures_per_chip_and_per_device():
    """The documented chip figures, divided over the devices a chip is: one device per v6e
    chip, two per TPU7x chip (one TensorCore each), one megacore device per v5p chip."""
    v6e = tpu_specs.device_spec(tpu_aot.topology_devices("v6e:1x1")[0])
    assert v6e.devices_per_chip == 1 and v6e.hbm_bytes == 32 * tpu_specs.GIB
    tpu7x = tpu_aot.topology_devices("TPU7x:1x1x1")
    assert len(tpu7x) == 2
    half = tpu_specs.device_spec(tpu7x[0])
    assert half.devices_per_chip == 2 and half.hbm_bytes == 96 * tpu_specs.GIB
    v5p = tpu_specs.device_spec(tpu_aot.topology_devices("v5p:2x2x1")[0])
    assert v5p.devices_per_chip == 1 and v5p.hbm_bytes_per_s == 2765e9


def test_documented_figures_agree_with_jax_table():
    """JAX's per-TensorCore table (what the kernels' tuning reads) and Google's pages agree
    within 3%, except v5p's HBM bandwidth, where the pages say 2765 GB/s (tpu_specs doc)."""
    import jax.experimental.pallas.tpu as pltpu

    chips = {
        "v4": pltpu.ChipVersion.TPU_V4,
        "v5e": pltpu.ChipVersion.TPU_V5E,
        "v5p": pltpu.ChipVersion.TPU_V5P,
        "v6e": pltpu.ChipVersion.TPU_V6E,
        "TPU7x": pltpu.ChipVersion.TPU_7X,
    }
    for name, version in chips.items():
        doc, info = tpu_specs.CHIPS[name], pltpu.get_tpu_info_for_chip(version, 1)
        cores = doc.tensor_cores
        pairs = {
            "hbm": (doc.hbm_bytes, info.hbm_capacity_bytes * cores),
            "flops": (doc.bf16_flops_per_s, info.bf16_ops_per_second * cores),
            "bandwidth": (doc.hbm_bytes_per_s, info.mem_bw_bytes_per_second * cores),
        }
        for what, (documented, table) in pairs.items():
            if (name, what) == ("v5p", "bandwidth"):
                assert documented / table == pytest.approx(2765 / 2460)
                continue
            assert documented == pytest.approx(table, rel=0.03), (name, what)


# ---------------------------------------------------------------- slow: v5p, TPU7x, tuning


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "TPU7x:1x1x1"])
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3MoeForCausalLM"])
def test_v5p_and_tpu7x(tmp_path_factory, arch, topology):
    model = config_dir(tmp_path_factory, arch)
    result = planner.plan(tpu_aot.EngineOptions(model=str(model), **ENGINE), topology)
    check_all_compiled(result, MOSAIC_PER_FORWARD[arch])


TUNING_TOPOLOGY = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


@pytest.mark.slow
@pytest.mark.parametrize("generation", sorted(TUNING_TOPOLOGY))
@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads, head_dim, page_size",
    [(32, 8, 128, 16), (32, 4, 128, 128), (8, 1, 128, 32), (16, 16, 64, 64)],
)
def test_tuning_table_block_sizes_compile(generation, num_q_heads, num_kv_heads, head_dim,
                                          page_size):  # fmt: skip
    """The block sizes ``tuning.pick_block_sizes`` gives each generation compile with Mosaic
    for that generation, for Llama-3-8B, Qwen3-30B-A3B, an 8:1 group and MHA shapes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from tpu_kernels.ragged_paged_attention import tpu, tuning

    devices = tpu_aot.topology_devices(TUNING_TOPOLOGY[generation])
    mesh = Mesh(np.array(devices[:1]).reshape(1), ("x",))
    one = NamedSharding(mesh, P())
    seqs, pages_per_seq, tokens = 8, 64, 256
    args = [
        jax.ShapeDtypeStruct(shape, dtype, sharding=one)
        for shape, dtype in [
            ((tokens, num_q_heads, head_dim), jnp.bfloat16),
            ((seqs * pages_per_seq, page_size, num_kv_heads, head_dim), jnp.bfloat16),
            ((seqs * pages_per_seq, page_size, num_kv_heads, head_dim), jnp.bfloat16),
            ((seqs,), jnp.int32),
            ((seqs, pages_per_seq), jnp.int32),
            ((seqs + 1,), jnp.int32),
            ((1,), jnp.int32),
        ]
    ]
    sizes = tuning.pick_block_sizes(
        num_q_heads, num_kv_heads, head_dim, page_size, "bfloat16", generation,
        pages_per_seq=pages_per_seq,
    )  # fmt: skip
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = jax.jit(
            lambda *a: tpu.ragged_paged_attention(*a, sm_scale=0.1, tpu_generation=generation)
        ).lower(*args)
    compiled = lowered.compile()
    assert 'custom_call_target="tpu_custom_call"' in compiled.as_text()
    assert sizes.vmem_limit_bytes <= tuning.GENERATIONS[generation].vmem_bytes


def test_tpu_engine_follows_the_target_not_this_cpu_host(tmp_path_factory):
    """Built for a TPU from this CPU host, the engine gets what a TPU host gets: the sampler's
    static flags (no run-time logprobs switch in its inputs) and vLLM's step size, not the
    CPU's per-core default (platform.cpu_batch_defaults)."""
    from tpu_plugin.platform import CPU_TOKENS_PER_CORE
    from tpu_plugin.runner.compile import dummy_sampling_inputs

    model = config_dir(tmp_path_factory, "LlamaForCausalLM")
    with tpu_aot.tpu_kernels():
        config = tpu_aot.engine_config(tpu_aot.EngineOptions(model=str(model), max_model_len=128))
        engine = tpu_aot.AbstractEngine(config, tpu_aot.topology_devices("v6e:1x1"))
        inputs = dummy_sampling_inputs(engine.runner, 2)
    assert inputs.want_logprobs is None
    assert config.scheduler_config.max_num_batched_tokens == 2048  # vllm serve's default
    # The same process on its own CPU backend keeps the CPU's choices.
    cpu = tpu_aot.engine_config(tpu_aot.EngineOptions(model=str(model), max_model_len=128))
    cap = max(256, CPU_TOKENS_PER_CORE * (os.cpu_count() or 1))
    assert cpu.scheduler_config.max_num_batched_tokens == min(2048, cap)
