"""Parallelism through vLLM's own front ends, on forced CPU devices.

The engine processes are spawned and inherit ``XLA_FLAGS=--xla_force_host_platform_device_count``
from this process's environment (set before the engine starts), so JAX there sees 8 (or, for
the Ray workers, 1 each) CPU devices. Greedy tokens are compared with Hugging Face's (the
single-device plugin is held to the same reference in tests/models), so "identical to HF" is
"identical to TP = 1".
"""

from __future__ import annotations

import re
import threading

import pytest
import requests
from transformers import LlamaConfig, Qwen3MoeConfig

from tests.conftest import greedy_tokens, hf_greedy, make_random_checkpoint, random_prompts
from tests.parallel.test_sharding import DIMS, MOE

PROMPT_LENGTHS = (5, 19, 33, 7)
MAX_TOKENS = 12


@pytest.fixture
def eight_cpu_devices(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setenv("TPU_PLUGIN_DEVICE", "cpu")
    # collective_rpc with a function (read the worker's shardings) pickles it by value.
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def layout_probe():
    """A function for ``collective_rpc`` that reads the worker's layout; built as a closure so
    it is pickled by value (Ray workers cannot import this test module)."""

    def worker_layout(worker) -> dict:
        """Runs in the worker: process count, mesh and a few parameters' per-device shard shapes."""
        import jax
        from flax import nnx

        runner = worker.model_runner
        shards = {}
        for path, var in nnx.to_flat_state(runner.params):
            value = var.get_value()
            shards[".".join(str(p) for p in path)] = list(value.sharding.shard_shape(value.shape))
        return {
            "processes": jax.process_count(),
            "mesh": dict(runner.sharding_plan.mesh.shape),
            "mesh_processes": sorted(
                {d.process_index for d in runner.sharding_plan.mesh.devices.flat}
            ),
            "shards": shards,
            "kv": str(runner.kv_caches[0][0].sharding.spec),
        }

    return worker_layout


def test_llm_tp2_matches_hf(tmp_path, make_llm, eight_cpu_devices):
    model_dir = make_random_checkpoint(tmp_path / "llama", LlamaConfig(**DIMS))
    prompts = random_prompts(DIMS["vocab_size"], PROMPT_LENGTHS)
    llm = make_llm(model_dir, tensor_parallel_size=2, skip_tokenizer_init=True, dtype="float32")
    got = greedy_tokens(llm, prompts, MAX_TOKENS)
    (layout,) = llm.collective_rpc(layout_probe())
    assert layout["mesh"] == {"data": 1, "model": 2}
    assert layout["shards"]["model.layers.0.self_attn.qkv_proj.weight"] == [1, 48, 64]
    assert layout["shards"]["model.layers.1.mlp.down_proj.weight"] == [64, 64]
    assert layout["kv"] == "P(None, None, 'model')"
    assert got == hf_greedy(model_dir, prompts, MAX_TOKENS)


@pytest.mark.slow
def test_llm_tp8_expert_parallel_moe_matches_hf(tmp_path, make_llm, eight_cpu_devices):
    cfg = Qwen3MoeConfig(**DIMS, **MOE, norm_topk_prob=True, tie_word_embeddings=False)
    model_dir = make_random_checkpoint(tmp_path / "qwen3-moe", cfg, norm_noise=0.2)
    prompts = random_prompts(DIMS["vocab_size"], PROMPT_LENGTHS)
    llm = make_llm(
        model_dir,
        tensor_parallel_size=8,
        enable_expert_parallel=True,
        skip_tokenizer_init=True,
        dtype="float32",
    )
    got = greedy_tokens(llm, prompts, MAX_TOKENS)
    (layout,) = llm.collective_rpc(layout_probe())
    assert layout["mesh"] == {"data": 1, "model": 8}
    assert layout["shards"]["model.layers.0.mlp.experts.gate_up_proj"] == [1, 64, 64]
    assert got == hf_greedy(model_dir, prompts, MAX_TOKENS)


@pytest.mark.slow
def test_ray_two_workers_tp2_matches_hf(tmp_path, make_llm, monkeypatch):
    """A local Ray cluster, vLLM's Ray executor, two JAX processes of one CPU device each."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("TPU_PLUGIN_DEVICE", "cpu")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    model_dir = make_random_checkpoint(tmp_path / "llama", LlamaConfig(**DIMS))
    prompts = random_prompts(DIMS["vocab_size"], PROMPT_LENGTHS)
    # One "TPU" slot per worker process (see tpu_plugin.parallel.mesh.RAY_DEVICE_KEYS).
    context = ray.init(num_cpus=2, resources={"TPU": 2}, include_dashboard=False)
    monkeypatch.setenv("RAY_ADDRESS", context.address_info["address"])
    try:
        llm = make_llm(
            model_dir,
            tensor_parallel_size=2,
            distributed_executor_backend="ray",
            skip_tokenizer_init=True,
            dtype="float32",
        )
        got = greedy_tokens(llm, prompts, MAX_TOKENS)
        layouts = llm.collective_rpc(layout_probe())
        llm.llm_engine.engine_core.shutdown()
    finally:
        ray.shutdown()
    assert len(layouts) == 2
    for layout in layouts:
        assert layout["processes"] == 2 and layout["mesh_processes"] == [0, 1]
        assert layout["mesh"] == {"data": 1, "model": 2}
        assert layout["shards"]["model.layers.0.self_attn.qkv_proj.weight"] == [1, 48, 64]
    assert got == hf_greedy(model_dir, prompts, MAX_TOKENS)


def _engine_counts(base: str) -> dict[str, float]:
    text = requests.get(base + "/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            engine = re.search(r'engine="(\d+)"', line).group(1)
            counts[engine] = counts.get(engine, 0.0) + float(line.rpartition(" ")[2])
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True], ids=["llama", "qwen3-moe-ep"])
def test_serve_dp2_two_streams_match_hf(tmp_path, eight_cpu_devices, moe):
    """``vllm serve --data-parallel-size 2``: two engine processes, each on its own devices,
    two concurrent request streams; every stream's greedy tokens equal HF's. Dense models run
    independent engines; MoE runs vLLM's DPEngineCoreProc (ranks step in waves)."""
    from tests.e2e.server import vllm_server

    if moe:
        cfg = Qwen3MoeConfig(**DIMS, **MOE, norm_topk_prob=True, tie_word_embeddings=False)
        model_dir = make_random_checkpoint(tmp_path / "qwen3-moe", cfg, norm_noise=0.2)
    else:
        model_dir = make_random_checkpoint(tmp_path / "llama", LlamaConfig(**DIMS))
    streams = [random_prompts(DIMS["vocab_size"], PROMPT_LENGTHS, seed=s) for s in (1, 2)]
    args = ("--data-parallel-size", "2", "--tensor-parallel-size", "2", "--max-model-len", "256")
    args += ("--kv-cache-memory-bytes", str(32 * 2**20), "--skip-tokenizer-init")
    args += ("--enable-expert-parallel",) if moe else ()
    got: dict[int, list[list[int]]] = {}
    with vllm_server(model_dir, *args, "--dtype", "float32", startup_timeout=600) as server:

        def run(index: int) -> None:
            outs = []
            for prompt in streams[index]:
                body = dict(
                    model=str(model_dir),
                    prompt=prompt,
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    ignore_eos=True,
                    return_token_ids=True,
                )
                r = requests.post(server.v1 + "/completions", json=body, timeout=300)
                r.raise_for_status()
                outs.append(r.json()["choices"][0]["token_ids"])
            got[index] = outs

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counts = _engine_counts(server.base)
    assert sorted(got) == [0, 1]
    for index, prompts in enumerate(streams):
        assert got[index] == hf_greedy(model_dir, prompts, MAX_TOKENS), f"stream {index}"
    assert set(counts) == {"0", "1"} and sum(counts.values()) == 2 * len(PROMPT_LENGTHS)
