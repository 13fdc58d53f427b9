"""Tensor and expert parallelism at the JAX level, on 8 forced CPU devices.

Each model runs in a fresh process (:mod:`tests.parallel.tp_check`) so JAX starts with
``--xla_force_host_platform_device_count=8`` whatever this pytest process initialised before.
Greedy tokens (prefill + decode through sharded paged KV caches) must equal TP = 1 exactly, and
the large weights must really be split: every device holds ``1 / tp`` of them.
Plus the start-up errors, which need no devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig, Qwen3MoeConfig

from tests.conftest import SMALL, make_random_checkpoint

ROOT = Path(__file__).resolve().parents[2]
# 8 query heads so that TP = 8 divides them; 2 KV heads: split at TP = 2, replicated at 4 and 8.
DIMS = SMALL | dict(num_attention_heads=8)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)


def run_tp_check(model_dir: Path, options: dict) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["TPU_PLUGIN_DEVICE"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.parallel.tp_check", str(model_dir), json.dumps(options)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def assert_same_tokens(results: dict) -> None:
    base = results["tp1"]["tokens"]
    for key, run in results.items():
        assert run["devices"] == 8
        assert run["tokens"] == base, f"{key}: greedy tokens differ from TP = 1"
    print({key: "identical" for key in results})


def test_llama_tp_1_2_4_8(tmp_path):
    model_dir = make_random_checkpoint(tmp_path / "llama", LlamaConfig(**DIMS))
    results = run_tp_check(model_dir, {"tp": [1, 2, 4, 8]})
    assert_same_tokens(results)
    layer = "model.layers.0."
    for tp in (2, 4, 8):
        shards = results[f"tp{tp}"]["shards"]
        assert shards[layer + "self_attn.o_proj.weight"] == [64, 64 // tp]
        # [gate; up] stacked: every device holds the same 128 / tp rows of both
        assert shards[layer + "mlp.gate_up_proj.weight"] == [128 // tp, 2, 64]
        assert shards[layer + "mlp.down_proj.weight"] == [64, 128 // tp]
        assert shards["model.embed_tokens.weight"] == [512 // tp, 64]
        assert shards["lm_head.weight"] == [512 // tp, 64]  # vocabulary split
        assert shards[layer + "input_layernorm.weight"] == [64]  # norms replicated
    # qkv_proj [kv_heads=2, (4 q + 1 k + 1 v heads) x 8, 64]. 2 KV heads: one whole group
    # (4 query heads with their K and V head) per device at TP = 2, pages split too; at 4 and 8
    # the pages are replicated and the weight is split on its input axis instead.
    assert results["tp2"]["shards"][layer + "self_attn.qkv_proj.weight"] == [1, 48, 64]
    assert results["tp2"]["kv_spec"] == "P(None, None, 'model')"
    for tp in (4, 8):
        shards = results[f"tp{tp}"]["shards"]
        assert shards[layer + "self_attn.qkv_proj.weight"] == [2, 48, 64 // tp]
        assert results[f"tp{tp}"]["kv_spec"] == "P()"


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"tp": [1, 2], "ep": [2, 4], "lengths": [5, 19]}, id="tp2-ep2-ep4"),
        pytest.param({"tp": [1, 4, 8]}, id="tp4-tp8", marks=pytest.mark.slow),
    ],
)
def test_qwen3_moe_tp_and_ep(tmp_path, options):
    cfg = Qwen3MoeConfig(**DIMS, **MOE, norm_topk_prob=True, tie_word_embeddings=False)
    model_dir = make_random_checkpoint(tmp_path / "qwen3-moe", cfg, norm_noise=0.2)
    results = run_tp_check(model_dir, options)
    assert_same_tokens(results)
    experts = "model.layers.0.mlp.experts."
    for tp in options["tp"][1:]:  # tensor parallelism inside every expert
        shards = results[f"tp{tp}"]["shards"]
        assert shards[experts + "gate_up_proj"] == [8, 64 // tp, 64]
        assert shards[experts + "down_proj"] == [8, 64, 32 // tp]
        # 8 heads of 16 over 2 KV heads: [2, (4 + 2) x 16, 64]; whole groups at TP = 2, split
        # on the input axis above (KV heads replicated)
        qkv = [1, 96, 64] if tp == 2 else [2, 96, 64 // tp]
        assert shards["model.layers.0.self_attn.qkv_proj.weight"] == qkv
        assert shards["model.layers.0.mlp.gate.weight"] == [8, 64]  # router replicated
    for ep in options.get("ep", []):  # whole experts per device
        shards = results[f"ep{ep}"]["shards"]
        assert shards[experts + "gate_up_proj"] == [8 // ep, 64, 64]
        assert shards[experts + "down_proj"] == [8 // ep, 64, 32]
        qkv = [1, 96, 64] if ep == 2 else [2, 96, 64 // ep]
        assert shards["model.layers.0.self_attn.qkv_proj.weight"] == qkv


# ---- start-up errors name the numbers ------------------------------------------------------


def test_sizes_the_sharding_cannot_take():
    from tpu_plugin.parallel.mesh import ParallelConfigError, layout_from

    cfg = LlamaConfig(**DIMS)
    with pytest.raises(ParallelConfigError, match="3 does not divide the model's 8 attention"):
        layout_from(cfg, 3, False)
    cfg_kv = LlamaConfig(
        **(DIMS | dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=4))
    )
    with pytest.raises(ParallelConfigError, match="6 and the model's 4 KV heads"):
        layout_from(cfg_kv, 6, False)
    with pytest.raises(ParallelConfigError, match="needs a mixture-of-experts model"):
        layout_from(cfg, 2, True)
    moe = Qwen3MoeConfig(**(DIMS | MOE | dict(num_experts=6)))
    with pytest.raises(ParallelConfigError, match="over 4 devices does not divide .* 6 experts"):
        layout_from(moe, 4, True)
    assert layout_from(cfg, 4, False).kv_heads_split is False  # 2 KV heads over 4: replicated


def test_more_devices_than_exist():
    import jax

    from tpu_plugin.parallel.mesh import ParallelConfigError, build_mesh, dp_device_slice

    available = len(jax.devices())
    with pytest.raises(ParallelConfigError, match=f"asks for 16 devices but JAX sees {available}"):
        build_mesh(16)
    with pytest.raises(ParallelConfigError, match=r"rank 1 needs devices \[4, 8\) .* has 6"):
        dp_device_slice(1, 4, 6)
    assert dp_device_slice(1, 2, 8) == range(2, 4)


def test_platform_rejects_sizes_at_start_up(tmp_path):
    """``vllm.LLM``'s config check (before any engine starts) names the numbers."""
    from vllm.engine.arg_utils import EngineArgs

    llama = make_random_checkpoint(tmp_path / "llama", LlamaConfig(**DIMS))
    gqa = LlamaConfig(
        **(DIMS | dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=4))
    )
    llama_gqa = make_random_checkpoint(tmp_path / "llama-gqa", gqa)
    for model_dir, kwargs, message in [
        # vLLM's own check comes first here; both name the numbers.
        (llama, dict(tensor_parallel_size=3), r"heads \(8\) must be divisible by .* size \(3\)"),
        (llama_gqa, dict(tensor_parallel_size=6), "6 and the model's 4 KV heads"),
        (llama, dict(pipeline_parallel_size=2), "does not support pipeline parallelism"),
    ]:
        args = EngineArgs(model=str(model_dir), skip_tokenizer_init=True, **kwargs)
        with pytest.raises(Exception, match=message):
            args.create_engine_config()
