"""MoE offload (``TPU_PLUGIN_MOE_OFFLOAD``): experts in host memory, a device expert cache.

The spec is the resident model: with offload on, the logits of every step must equal the
resident run's bit for bit (the same kernel call over the cache array, ids mapped to slots),
for every MoE family and both policies, with a cache smaller than one layer's experts (so
every step fetches, evicts and, in the prefill, overflows into passes). Through ``vllm.LLM``
the greedy tokens equal Hugging Face's (which the resident port already equals). The
policies are then compared on a declared skew: the history-driven one must hit more often
than plain LRU.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import SMALL, assert_greedy_matches_hf, random_prompts
from tests.models import helpers, test_deepseek_v3, test_mixtral, test_qwen3_moe


def make_checkpoint(tmp_path, family: str):
    if family == "deepseek-v3":
        config = test_deepseek_v3.CONFIGS["dsv3-qlora-interleave"]()
        return test_deepseek_v3.make_checkpoint(tmp_path / family, config)
    configs = test_qwen3_moe.CONFIGS if family == "qwen3-moe" else test_mixtral.CONFIGS
    return helpers.checkpoint(tmp_path, configs, family)


FAMILIES = ("qwen3-moe", "mixtral", "deepseek-v3")


def run_steps(model_dir, prompts, steps: int, offload=None, affinity=None):
    """Per-step logits and (offload) the cache's counters (tools/offload_steps.py)."""
    from tpu_plugin.tools.offload_steps import run_steps as run

    result = run(str(model_dir), prompts, steps, offload, affinity)
    return result.logits, result.counters


PROMPTS = random_prompts(SMALL["vocab_size"], (5, 17, 3, 11))


# The default tier proves one family (each costs ~6 step compiles); the others run with -m slow.
FAMILY_TIERS = [
    family if family == "qwen3-moe" else pytest.param(family, marks=pytest.mark.slow)
    for family in FAMILIES
]


@pytest.mark.parametrize("family", FAMILY_TIERS)
def test_offloaded_logits_equal_resident(tmp_path, family):
    """Both policies, a cache of 3 slots per MoE layer (6 < one layer's 8 experts): every
    step's logits equal the resident model's exactly; the cache fetched, evicted, prefetched
    (predict) and served the prefill in overflow passes. LRU runs on the predict stepper's
    host experts (``Stepper.with_policy``, what the benchmark does), so that path is proven
    equal too, and so is LRU with its demand copies issued four a loop iteration."""
    from tpu_plugin.tools.offload_steps import load

    model_dir = make_checkpoint(tmp_path, family)
    resident, _ = run_steps(model_dir, PROMPTS, 6)
    stepper = load(str(model_dir), len(PROMPTS), ("predict", ("experts", 3), 2))
    for policy, chunk in (("predict", 1), ("lru", 1), ("lru", 4)):
        if (policy, chunk) != (stepper.offload.policy, stepper.offload.spec.copy_chunk):
            stepper = stepper.with_policy(policy, copy_chunk=chunk)
        result = stepper.run(PROMPTS, 6)
        got, counts = result.logits, result.counters
        # TPU_PLUGIN_MOE_OFFLOAD_COPY_CHUNK=4: the same experts copied, spares to the trash
        assert (counts["padding_copies"] > 0) == (chunk > 1), counts
        print(f"{family} {policy}: {counts}")
        for i, (a, b) in enumerate(zip(resident, got, strict=True)):
            assert np.array_equal(a, b), f"{family} {policy}: step {i} logits differ"
        assert counts["fetched"] > 0 and counts["overflow_passes"] > 0
        assert 0 < counts["hit_rate"] < 1
        assert counts["tokens"] == sum(map(len, PROMPTS)) + 5 * len(PROMPTS)
        if policy == "predict":
            assert counts["prefetched"] + counts["wasted_prefetches"] == 2 * 6
        else:
            assert counts["prefetched"] == counts["wasted_prefetches"] == 0


def test_the_cache_is_updated_in_place_under_a_declared_router(tmp_path, monkeypatch):
    """A router that does not read the hidden state (the benchmarks' declared skew) lets the
    compiler run every layer's copy loop before any layer's kernel, so each kernel needs its own
    version of the cache and the whole cache is copied at every layer (found in the H200
    profile: 20.8 of 45 ms a step). ``moe_offload.after_reads`` ties each kernel's output to
    the cache arrays; without it, the copies come back (so this check can fail)."""
    from tpu_plugin.layers import moe_offload
    from tpu_plugin.tools.direct_steps import ragged_step
    from tpu_plugin.tools.hlo_inventory import copies_of
    from tpu_plugin.tools.offload_steps import empty_caches, load, step_program
    from tpu_plugin.tools.skewed_routing import zipf_affinity

    stepper = load(str(make_checkpoint(tmp_path, "qwen3-moe")), 1, ("lru", ("experts", 3), 0))
    cfg, off = stepper.cfg, stepper.offload
    routing = jnp.asarray(zipf_affinity(0, 1, cfg.num_hidden_layers, cfg.num_experts, 0.8))
    off.cache = off.fresh_cache()
    kv = off.attach(empty_caches(cfg, stepper.pages_per_seq, stepper.dtype))
    step = ragged_step([[5]], [0], stepper.pages_per_seq, stepper.pages_per_seq)
    shapes = [off.cache.gate_up.shape, off.cache.down.shape]

    def copies() -> int:  # a new program each time: traced with the module as it is now
        program = step_program(stepper.graphdef, off, stepper.routing_seed)
        compiled = program.lower(stepper.params, kv, step, routing).compile()
        return copies_of(compiled.as_text(), shapes)

    assert copies() == 0
    monkeypatch.setattr(moe_offload, "after_reads", lambda out, cache: (out, cache))
    assert copies() > 0


@pytest.mark.slow
def test_offload_with_a_cache_holding_every_expert_fetches_nothing(tmp_path):
    """``TPU_PLUGIN_MOE_OFFLOAD_CACHE=1.0``: the cache starts with every expert; no copy."""
    model_dir = make_checkpoint(tmp_path, "qwen3-moe")
    resident, _ = run_steps(model_dir, PROMPTS, 3)
    got, counts = run_steps(model_dir, PROMPTS, 3, ("lru", ("fraction", 1.0), 0))
    assert all(np.array_equal(a, b) for a, b in zip(resident, got, strict=True))
    assert counts["fetched"] == 0 and counts["hit_rate"] == 1.0


@pytest.mark.slow
def test_history_beats_lru_on_a_skewed_router(tmp_path):
    """Four requests, each with its own Zipf(1.2) expert affinity per layer, 12 decode steps
    on a cache of 4 slots per layer (half a layer): the per-request history keeps each
    request's favourites resident and must hit more often than LRU; both stay exact."""
    from tpu_plugin.tools.skewed_routing import zipf_affinity

    model_dir = make_checkpoint(tmp_path, "qwen3-moe")
    routing = jnp.asarray(zipf_affinity(0, len(PROMPTS), 2, 8, 1.2))
    resident, _ = run_steps(model_dir, PROMPTS, 12, affinity=routing)
    rates = {}
    for policy in ("predict", "lru"):
        got, counts = run_steps(model_dir, PROMPTS, 12, (policy, ("experts", 4), 1), routing)
        assert all(np.array_equal(a, b) for a, b in zip(resident, got, strict=True)), policy
        rates[policy] = counts["hit_rate"]
    print(f"hit rates on Zipf(1.2): {rates}")
    assert rates["predict"] > rates["lru"]


def test_greedy_through_llm_with_the_engine_argument(tmp_path, make_llm, monkeypatch):
    """``LLM(additional_config={"moe_offload": ...})`` (``--additional-config`` of ``vllm
    serve``), predict policy, 3 slots per layer (6 of 16 experts): the greedy tokens of 8
    ragged prompts equal HF's, which the resident port equals (``test_qwen3_moe``); the
    worker's counters (``expert_cache.worker_counters``) show fetches, a hit rate in (0, 1)
    and the tokens served."""
    from tests.conftest import greedy_tokens, hf_greedy
    from tpu_plugin.runner.expert_cache import worker_counters

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(function)
    model_dir = make_checkpoint(tmp_path, "qwen3-moe")
    prompts = helpers.prompts()
    expected = hf_greedy(model_dir, prompts, 16)
    config = {"moe_offload": {"policy": "predict", "cache": "3", "prefetch": 2}}
    llm = make_llm(model_dir, skip_tokenizer_init=True, dtype="float32", additional_config=config)
    assert greedy_tokens(llm, prompts, 16) == expected
    (counts,) = llm.collective_rpc(worker_counters)
    print(f"through vllm.LLM: {counts}")
    assert counts["fetched"] > 0 and 0 < counts["hit_rate"] < 1
    assert counts["tokens"] >= sum(map(len, prompts)) + 15 * len(prompts)


def test_host_reader_reads_the_checkpoint_dtypes(tmp_path):
    """The loader's host reader (``loader.HostReader``) returns bfloat16, float8 and float32
    tensors of a safetensors file bit for bit (safetensors' own NumPy reader rejects bf16)."""
    import torch
    from safetensors.torch import save_file

    from tpu_plugin.models.loader import HostReader

    tensors = {
        "bf16": torch.randn(3, 5, dtype=torch.bfloat16),
        "fp8": torch.randn(4, 2).to(torch.float8_e4m3fn),
        "fp32": torch.randn(7),
    }
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    reader = HostReader(str(tmp_path / "t.safetensors"))
    for name, tensor in tensors.items():
        got = reader.get_tensor(name)
        assert got.shape == tuple(tensor.shape)
        assert np.array_equal(got.astype(np.float32), tensor.float().numpy()), name


def test_settings_from_the_engine_argument_win_over_the_environment(monkeypatch):
    """``additional_config["moe_offload"]`` fields override ``TPU_PLUGIN_MOE_OFFLOAD*``; the
    ones it lacks come from the environment; a wrong field fails with the list of fields."""
    from tpu_plugin.runner.expert_cache import offload_settings
    from tpu_plugin.startup import StartupError

    monkeypatch.setenv("TPU_PLUGIN_MOE_OFFLOAD", "lru")
    monkeypatch.setenv("TPU_PLUGIN_MOE_OFFLOAD_PREFETCH", "7")
    assert offload_settings({}) == ("lru", ("fraction", 0.25), 7)
    given = {"moe_offload": {"policy": "predict", "cache": "2GiB"}}
    assert offload_settings(given) == ("predict", ("bytes", 2 * 2**30), 7)
    assert offload_settings({"moe_offload": "off"})[0] == "off"
    with pytest.raises(StartupError, match="unknown fields"):
        offload_settings({"moe_offload": {"polcy": "lru"}})
    with pytest.raises(StartupError, match="not valid"):
        offload_settings({"moe_offload": {"cache": "lots"}})


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "deepseek-v3"])
@pytest.mark.parametrize("policy", ["predict", "lru"])
def test_greedy_through_llm_matches_hf_slow(tmp_path, make_llm, monkeypatch, family, policy):
    monkeypatch.setenv("TPU_PLUGIN_MOE_OFFLOAD", policy)
    monkeypatch.setenv("TPU_PLUGIN_MOE_OFFLOAD_CACHE", "3")
    model_dir = make_checkpoint(tmp_path, family)
    assert_greedy_matches_hf(make_llm, model_dir, helpers.prompts())
