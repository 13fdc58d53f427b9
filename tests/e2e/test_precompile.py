"""Precompilation at start-up: after ``vllm.LLM(...)`` returns, serving compiles nothing.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that JAX's
compilation events of the engine are seen here. The workload mixes prompt lengths, batch
sizes, chunked prefill (prompts longer than the 32-token step budget), decode-only steps,
greedy and sampled requests, top-k/top-p, seeds and logprobs; async scheduling is vLLM's
default and on. A second start-up in a fresh process loads the precompiled programs from the
executable cache (tpu_plugin/runner/executable_cache.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from transformers import LlamaConfig

from tests.conftest import SMALL, make_random_checkpoint, random_prompts
from tpu_plugin.runner.compile import BACKEND_COMPILE_EVENT

COMPILE_EVENT = BACKEND_COMPILE_EVENT  # the event the runner counts (worker_compile_count)
ROOT = str(Path(__file__).resolve().parents[2])  # the children import tests.conftest


# Small engine: 32-token steps over 128-token sequences, so a few prompts cover every bucket.
ENGINE_ARGS = dict(
    skip_tokenizer_init=True,
    dtype="float32",
    max_model_len=128,
    max_num_seqs=4,
    max_num_batched_tokens=32,
    block_size=16,
    kv_cache_memory_bytes=8 * 2**20,
)


@pytest.fixture
def compile_counter():
    """Counts XLA backend compilations (persistent-cache hits included) from now on."""
    events: list[str] = []
    active = [True]

    def listener(event: str, duration: float, **_: object) -> None:
        if active[0] and event == COMPILE_EVENT:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    active[0] = False


def test_no_compilation_while_serving(tmp_path, monkeypatch, make_llm, compile_counter):
    from vllm import SamplingParams

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("TPU_PLUGIN_PRECOMPILE", "1")
    monkeypatch.setenv("TPU_PLUGIN_COMPILE_CACHE", str(tmp_path / "cache"))
    model_dir = make_random_checkpoint(tmp_path / "llama", LlamaConfig(**SMALL))
    llm = make_llm(model_dir, **ENGINE_ARGS)
    assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling
    at_start = len(compile_counter)
    print("=== serving starts ===", flush=True)
    assert at_start > 0, "start-up compiled nothing: precompilation did not run"

    def run(lengths, params, seed=1):
        prompts = random_prompts(512, lengths=lengths, seed=seed)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0] for o in outs]

    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    run((3,), greedy)  # batch of one
    run((3, 17, 5, 70, 9, 1, 28, 12), greedy)  # ragged, queued beyond max_num_seqs, chunked
    run((100,), greedy)  # one long prompt: several 32-token chunks
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=10, seed=7)
    run((5, 40, 2), sampled, seed=2)
    outs = run((8, 30), SamplingParams(temperature=1.0, max_tokens=6, logprobs=3), seed=3)
    assert all(len(o.logprobs) == len(o.token_ids) for o in outs)
    run((6, 50, 11), SamplingParams(temperature=0.0, max_tokens=8, logprobs=1), seed=4)
    during = len(compile_counter) - at_start
    print(f"start-up compiled {at_start} programs; serving compiled {during}")
    assert during == 0, f"{during} programs compiled while serving"

    # A processor start-up does not precompile (penalties): compiled on first use for each
    # shape the request meets (its prefill and its decode), counted and logged once; the same
    # request again compiles nothing more.
    penalty = SamplingParams(temperature=0.0, max_tokens=4, repetition_penalty=1.3)
    run((7,), penalty)
    lazy = llm.collective_rpc(_lazy_compiles)[0]
    assert lazy and all(kind == "sampler" and key[-1] == ("penalties",) for kind, key in lazy)
    after_first = len(compile_counter)
    run((7,), penalty)
    assert llm.collective_rpc(_lazy_compiles)[0] == lazy
    assert len(compile_counter) == after_first


def _lazy_compiles(worker) -> list:
    return sorted(worker.model_runner._lazy.seen, key=repr)


def _cache_counts(worker) -> dict[str, int]:
    cache = worker.model_runner._executable_cache
    return {"hits": cache.hits, "misses": cache.misses, "stored": cache.stored}


def start_up_child(model_dir: str) -> None:
    """One start-up in this fresh process: the cache's counts and greedy tokens, as JSON."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, **ENGINE_ARGS)
    counts = llm.collective_rpc(_cache_counts)[0]
    prompts = random_prompts(512, lengths=(3, 17, 40), seed=5)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    print(json.dumps(counts | {"tokens": [list(o.outputs[0].token_ids) for o in outs]}))
    llm.llm_engine.engine_core.shutdown()


def test_second_start_up_loads_the_executable_cache(tmp_path):
    model_dir = make_random_checkpoint(tmp_path / "llama", LlamaConfig(**SMALL))
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        TPU_PLUGIN_PRECOMPILE="1",
        TPU_PLUGIN_COMPILE_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    )
    results = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, __file__, str(model_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith('{"hits"'))
        results.append(json.loads(line))
    first, second = results
    print({k: v for k, v in first.items() if k != "tokens"}, second)
    assert first["stored"] == first["misses"] > 0 and first["hits"] == 0
    assert second == {**first, "hits": first["stored"], "misses": 0, "stored": 0}


if __name__ == "__main__":
    os.environ.setdefault("TPU_PLUGIN_DEVICE", "cpu")
    start_up_child(sys.argv[1])
