"""The executable cache (tpu_plugin/runner/executable_cache.py): a warm start-up loads every
precompiled program without tracing it, any change of what decides a program misses, a
broken entry is compiled again, and loaded programs compute what fresh ones do.

The runner-level checks build a ``JaxModelRunner`` for a 2-layer random Llama outside the
engine (no ``vllm.LLM``); the tensor-parallel one runs in fresh processes on 2 forced CPU
devices, which is also what a real second start-up is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def build_runner(model_dir: Path, tp: int = 1, tokens: int = 16, async_scheduling: bool = True):
    """A loaded runner with its KV cache, as the worker builds it (no engine)."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    from tpu_plugin.runner.model_runner import JaxModelRunner

    config = EngineArgs(
        model=str(model_dir),
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=64,
        max_num_seqs=2,
        max_num_batched_tokens=tokens,
        block_size=16,
        tensor_parallel_size=tp,
        async_scheduling=async_scheduling,
    ).create_engine_config()
    with set_current_vllm_config(config):
        runner = JaxModelRunner(config)
        runner.load_model()
        spec = runner.get_kv_cache_spec()
        group = KVCacheGroupSpec(list(spec), next(iter(spec.values())))
        runner.initialize_kv_cache(
            KVCacheConfig(num_blocks=12, kv_cache_tensors=[], kv_cache_groups=[group])
        )
    return runner


def precompile_counted(runner) -> tuple[dict, dict[str, int]]:
    """Runs precompile; the cache's counts and JAX's trace/compile events meanwhile."""
    from tpu_plugin.runner.precompile import precompile

    events = {TRACE_EVENT: 0, COMPILE_EVENT: 0}
    active = [True]

    def listener(event: str, duration: float, **_: object) -> None:
        if active[0] and event in events:
            events[event] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        precompile(runner)
    finally:
        active[0] = False
    cache = runner._executable_cache
    counts = {"hits": cache.hits, "misses": cache.misses, "stored": cache.stored}
    return counts, {"traces": events[TRACE_EVENT], "compiles": events[COMPILE_EVENT]}


def outputs(runner) -> dict[str, list]:
    """Logits of a real prefill through the largest bucket's program, and sampled tokens."""
    from tpu_plugin.runner.compile import (
        dummy_sampling_inputs,
        dummy_step,
        run_sampler,
        step_buckets,
        step_key,
    )

    bucket = step_buckets(
        runner.scheduler_config.max_num_batched_tokens,
        runner.max_num_seqs,
        runner.max_model_len,
        runner.block_size,
    )[-1]
    prev = runner._last_tokens if runner.async_scheduling else None
    step = dummy_step(bucket, runner.num_pages, runner.block_size, prev)
    tokens = bucket.tokens
    ids = np.random.default_rng(0).integers(3, 500, tokens).astype(np.int32)
    step = step._replace(
        input_ids=jnp.asarray(ids),
        positions=jnp.arange(tokens, dtype=jnp.int32),
        logits_indices=jnp.full(bucket.seqs, tokens - 1, jnp.int32),
    )
    runner.kv_caches, logits = runner._compiled[step_key(step)](
        runner.params, runner.kv_caches, step
    )
    inputs = jax.device_put(dummy_sampling_inputs(runner, bucket.seqs))
    flags = dict(all_greedy=True, use_top_k_top_p=False, num_logprobs=0)
    flags["logprobs_mode"] = runner.model_config.logprobs_mode
    sampled = run_sampler(runner._compiled_samplers, logits, inputs, flags)
    return {
        "logits": np.asarray(logits).round(5).tolist(),
        "tokens": np.asarray(sampled.token_ids).tolist(),
    }


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    from tests.conftest import SMALL, make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("llama"), LlamaConfig(**SMALL))


def test_second_precompile_loads_everything_untraced(tmp_path, monkeypatch, llama_dir):
    from tpu_plugin.runner.compile import startup_programs

    monkeypatch.setenv("TPU_PLUGIN_COMPILE_CACHE", str(tmp_path / "cache"))
    first = build_runner(llama_dir)
    counts, events = precompile_counted(first)
    programs = len(first._compiled) + len(first._compiled_samplers)
    assert counts == {"hits": 0, "misses": programs, "stored": programs}
    # The one program list (the TPU planner's too): forwards and samplers are cached, the
    # async token recorders (one per sequence bucket, after its sampler) go to JAX's cache.
    # On CPU one sampler program per sequence bucket: its flags are decided at run time.
    listed = startup_programs(first)
    assert [p.kind for p in listed if p.kind != "forward"] == ["sampler", "record"] * 2
    assert sum(p.kind != "record" for p in listed) == programs
    # TPU programs keep greedy and top-k/top-p static: 4x the sampler programs.
    assert sum(p.kind == "sampler" for p in startup_programs(first, platform="tpu")) == 16
    assert events["traces"] >= programs
    fresh = outputs(first)

    # A new runner has a new forward function: without the cache every bucket is traced.
    second = build_runner(llama_dir)
    counts, events = precompile_counted(second)
    assert counts == {"hits": programs, "misses": 0, "stored": 0}
    assert events == {"traces": 0, "compiles": 0}
    assert outputs(second) == fresh

    # A broken entry (here: cut short) is logged, compiled again and replaced.
    entries = sorted((tmp_path / "cache" / "executables").glob("*.jaxexe"))
    assert len(entries) == programs
    entries[0].write_bytes(entries[0].read_bytes()[:1000])
    third = build_runner(llama_dir)
    counts, _ = precompile_counted(third)
    assert counts == {"hits": programs - 1, "misses": 1, "stored": 1}
    assert outputs(third) == fresh

    # Other buckets (a larger step budget): the shared ones load, the new ones compile.
    wider = build_runner(llama_dir, tokens=32)
    counts, _ = precompile_counted(wider)
    assert counts["hits"] > 0 and counts["stored"] == counts["misses"] > 0


def test_key_covers_what_decides_a_program(tmp_path, monkeypatch):
    from tpu_plugin.runner import executable_cache as ec

    monkeypatch.setenv("TPU_PLUGIN_ATTENTION", "reference")
    x = jnp.ones((4, 8), jnp.float32)
    jitted = jax.jit(lambda a, b: a * 2 + b, donate_argnums=(0,))
    cache = ec.ExecutableCache(tmp_path, {"hf_config": "a"})
    key = cache.key("f", ec.describe((x, x)))
    assert cache.store(key, jitted.lower(x, x).compile())
    assert list(tmp_path.glob(".tmp-*")) == []  # written whole, then renamed
    loaded = cache.load(key, (x, x))
    assert loaded is not None
    np.testing.assert_array_equal(loaded(jnp.ones((4, 8)), x), np.full((4, 8), 3.0))
    donated = jnp.ones((4, 8))
    loaded(donated, x)
    assert donated.is_deleted()  # the loaded program still donates its first argument

    def key_of(context: dict, *args) -> str:
        return ec.ExecutableCache(tmp_path, context).key("f", ec.describe(args or (x, x)))

    assert key_of({"hf_config": "a"}) == key
    assert key_of({"hf_config": "b"}) != key  # model config
    assert key_of({"hf_config": "a"}, x, x.astype(jnp.bfloat16)) != key  # dtype
    assert key_of({"hf_config": "a"}, x, jnp.ones((4, 16))) != key  # shape
    assert cache.key("g", ec.describe((x, x))) != key  # program / static flags
    monkeypatch.setenv("TPU_PLUGIN_ATTENTION", "pallas-interpret")
    assert key_of({"hf_config": "a"}) != key  # attention implementation
    monkeypatch.setenv("TPU_PLUGIN_ATTENTION", "reference")
    monkeypatch.setattr(ec, "source_digest", lambda: "edited")
    assert key_of({"hf_config": "a"}) != key  # the plugin's source
    monkeypatch.undo()
    monkeypatch.setenv("TPU_PLUGIN_ATTENTION", "reference")
    monkeypatch.setenv("TPU_PLUGIN_COMPILE_CACHE", "/elsewhere")  # where, not what
    assert key_of({"hf_config": "a"}) == key

    # Garbage under a key is a miss (removed, logged), never an error.
    (tmp_path / f"{key}.jaxexe").write_bytes(b"not a pickle")
    assert cache.load(key, (x, x)) is None
    assert not (tmp_path / f"{key}.jaxexe").exists()


def test_off_disables_both_caches(monkeypatch):
    from tpu_plugin.runner.executable_cache import ExecutableCache

    monkeypatch.setenv("TPU_PLUGIN_COMPILE_CACHE", "off")

    class Runner:
        model_impl = "jax"

    assert ExecutableCache.for_runner(Runner()) is None


def child(model_dir: str, tp: int) -> None:
    """One start-up in this fresh process: precompile, then the counts and outputs as JSON."""
    # Without async scheduling: its token-record programs are plain jits, traced every time.
    runner = build_runner(Path(model_dir), tp=tp, async_scheduling=False)
    counts, events = precompile_counted(runner)
    shardings = [leaf.sharding for leaf in jax.tree.leaves(runner.params)]
    mesh = {
        "devices": sorted({d.id for s in shardings for d in s.device_set}),
        "split": sum(not s.is_fully_replicated for s in shardings),
    }
    print(json.dumps(counts | events | outputs(runner) | {"mesh": mesh}))


# slow: 35 s (two fresh processes); the single-device cache tests stay in the default suite
@pytest.mark.slow
def test_tensor_parallel_programs_load_in_a_fresh_process(tmp_path, llama_dir):
    """Two start-ups (fresh processes) on a 2-device mesh: the second loads every sharded
    program from the cache, traces none and computes the same logits."""
    env = dict(
        os.environ,
        TPU_PLUGIN_COMPILE_CACHE=str(tmp_path / "cache"),
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    cmd = [sys.executable, __file__, str(llama_dir), "2"]
    results = []
    for _ in range(2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = results
    print({k: v for k, v in first.items() if k not in ("logits", "tokens")})
    assert first["mesh"]["devices"] == [0, 1] and first["mesh"]["split"] > 0
    programs = first["stored"]
    assert programs > 0 and first["hits"] == 0
    assert second["hits"] == programs and second["stored"] == 0
    assert second["traces"] == 0 and second["compiles"] == 0
    assert second["logits"] == first["logits"] and second["tokens"] == first["tokens"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("TPU_PLUGIN_DEVICE", "cpu")
    child(sys.argv[1], int(sys.argv[2]))
