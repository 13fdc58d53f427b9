"""``tpu_plugin.tools.hlo_inventory``: the kernels of a compiled decode program, and the trace join.

A 2-layer Llama compiled for this host's CPU: every projection is one matmul kernel that reads
its weight in place (fused q/k/v and gate/up included), and no kernel copies a weight (a
per-step relayout of a weight would double its bytes on a memory-bound step). The trace join
runs on a real JAX profiler trace of the CPU runtime, whose events name their HLO instruction.
"""

from __future__ import annotations

import glob
import json

import jax
import jax.numpy as jnp
from transformers import LlamaConfig

from tpu_plugin.tools import hlo_inventory, hlo_trace

LAYERS = 2


def tiny_llama(directory) -> str:
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    (directory / "config.json").write_text(json.dumps(cfg.to_dict()))
    return str(directory)


def test_decode_program_reads_every_weight_once(tmp_path):
    model = tiny_llama(tmp_path)
    args = hlo_inventory.parse_args(
        ["--model", model, "--batch", "2", "--context", "32", "--dtype", "float32"]
    )
    kernels, layers, text = hlo_inventory.compile_inventory(model, args)
    assert layers == LAYERS and "ENTRY" in text
    matmuls = [k for k in kernels if k.role == "matmul"]
    # per layer qkv_proj, o_proj, gate_up_proj, down_proj; then lm_head
    assert len(matmuls) == 4 * LAYERS + 1, [k.weights for k in matmuls]
    read = sorted(w for k in matmuls for w in k.weights)
    want = [
        f"model.layers.{i}.{m}.weight"
        for i in range(LAYERS)
        for m in ("mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj")
    ]
    assert read == sorted([*want, "lm_head.weight"])
    copies = [k for k in kernels if k.role != "matmul" and any("proj" in w for w in k.weights)]
    assert not copies, [(k.name, k.role, k.weights) for k in copies]
    summary = hlo_inventory.summary(kernels, layers)
    assert summary["kernels"] == len(kernels) and summary["roles"]["matmul"] == len(matmuls)


def test_trace_join_names_every_kernel(tmp_path):
    def f(x, w1, w2):
        return jnp.sort(jnp.tanh(x @ w1) @ w2, axis=-1)

    args = (jnp.ones((8, 64)), jnp.ones((64, 128)), jnp.ones((128, 64)))
    compiled = jax.jit(f).lower(*args).compile()
    kernels = hlo_inventory.inventory(compiled.as_text())
    assert sum(k.role == "matmul" for k in kernels) == 2
    compiled(*args).block_until_ready()
    steps = 3
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(steps):
            compiled(*args).block_until_ready()
    (trace,) = glob.glob(f"{tmp_path}/**/*.xplane.pb", recursive=True)
    events = hlo_trace.trace_events(trace)
    timing = hlo_trace.join_trace(kernels, events, steps)
    assert not timing["unmatched_ms_per_step"]
    per_kernel = timing["ms_per_step_by_kernel"]
    assert set(per_kernel) == {k.name for k in kernels}
    assert all(row["calls"] == 1 and row["ms"] > 0 for row in per_kernel.values())
    assert timing["ms_per_step_by_role"]["matmul"] > 0
