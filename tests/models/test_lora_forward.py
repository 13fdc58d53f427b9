"""Multi-LoRA at the JAX level against Hugging Face PEFT (fp32), one mixed batch.

The port's forward with adapter slots (``tpu_plugin.layers.lora``) runs one ragged step whose
prompts use different adapters and the base model; every prompt's last-position logits must
equal PEFT's for its adapter. The adapters are read by vLLM's own loader (``LoRAModel``, as
the worker does) and packed by the production code (``LoRATarget.pack``); only the writes into
the slots are done here by hand (the runner's ``SlotWriter`` is exercised end to end).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoConfig, LlamaConfig, Qwen3Config

from tests.conftest import SMALL, make_random_checkpoint, max_rel_error, random_prompts
from tests.lora_adapters import ADAPTERS, make_adapters, peft_last_logits
from tpu_plugin.layers.lora import TARGET_MODULES, attach_slots, token_adapters
from tpu_plugin.models.llama import head_dim_of
from tpu_plugin.models.loader import load_model
from tpu_plugin.tools.direct_steps import PAGE_SIZE, empty_kv_caches, ragged_step

MAX_RANK = 8
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True),
}
# prompt i uses adapter CHOICE[i] (-1: the base model); every adapter and the base appear
CHOICE = [0, 1, -1, 2, 3, 1, -1, 0]
LENGTHS = (5, 17, 3, 9, 12, 1, 7, 20)


def fill_slots(model, targets, adapters, max_rank: int) -> None:
    """Adapter ``i`` into slot ``i`` (vLLM's loader, the production packing)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    flat = dict(nnx.to_flat_state(nnx.state(model)))
    for slot, adapter in enumerate(adapters):
        helper = PEFTHelper.from_local_dir(str(adapter), None)
        lora = LoRAModel.from_local_checkpoint(
            str(adapter), set(TARGET_MODULES), helper, lora_model_id=slot + 1, device="cpu"
        )
        for target in targets:
            weights = {}
            for name, (part, _) in zip(target.module_names(), target.parts, strict=True):
                if (w := lora.get_lora(name)) is not None:
                    weights[part] = (w.lora_a.numpy(), w.lora_b.numpy(), w.scaling)
            a, b = target.pack(weights, max_rank)
            var_a, var_b = flat[(*target.path, "lora", "a")], flat[(*target.path, "lora", "b")]
            var_a.set_value(var_a.get_value().at[slot].set(a))
            var_b.set_value(var_b.get_value().at[..., slot, :].set(b))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_adapter_batch_matches_peft(tmp_path, name):
    base = make_random_checkpoint(tmp_path / name, CONFIGS[name](), norm_noise=0.2)
    adapters = make_adapters(tmp_path, base)
    cfg = AutoConfig.from_pretrained(base)
    model = load_model(str(base), cfg, jnp.float32)
    targets = attach_slots(model, len(ADAPTERS) + 1, MAX_RANK, jnp.float32)  # a spare slot
    fill_slots(model, targets, adapters, MAX_RANK)

    prompts = random_prompts(SMALL["vocab_size"], LENGTHS)
    pages_per_seq = -(-max(LENGTHS) // PAGE_SIZE)
    step = ragged_step(prompts, [0] * len(prompts), pages_per_seq, pages_per_seq * len(prompts))
    slots = np.full(step.input_ids.shape[0], -1, np.int32)
    slots[: sum(LENGTHS)] = np.repeat(CHOICE, LENGTHS)
    dims = (cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim_of(cfg))
    caches = empty_kv_caches(dims, pages_per_seq * len(prompts))
    with token_adapters(jnp.asarray(slots)):
        _, hidden = model(caches, step.input_ids, step.positions, step.attention)
    logits = np.asarray(model.compute_logits(hidden[step.logits_indices]))

    expected = {
        which: peft_last_logits(base, adapters[which] if which >= 0 else None, prompts)
        for which in sorted(set(CHOICE))
    }
    for i, which in enumerate(CHOICE):
        rel = max_rel_error(logits[i], expected[which][i])
        print(f"{name} prompt {i} adapter {which}: logits rel. error {rel:.2e}")
        assert rel <= 1e-4, f"prompt {i} (adapter {which}): rel. error {rel:.2e}"
        if which >= 0:  # the adapter really changes the output
            assert max_rel_error(expected[-1][i], expected[which][i]) > 1e-2


def test_steps_without_adapters_are_the_base_program(tmp_path):
    """Outside ``token_adapters`` (a step with no adapter) the slots add nothing: the traced
    program has no LoRA work, and its logits are the base model's even with slots filled."""
    import jax

    base = make_random_checkpoint(tmp_path / "llama", CONFIGS["llama"]())
    adapters = make_adapters(tmp_path, base, ADAPTERS[:1])
    cfg = AutoConfig.from_pretrained(base)
    model = load_model(str(base), cfg, jnp.float32)
    plain = jax.jit(lambda x: model.model.layers[0].mlp.down_proj(x)).lower(
        jnp.zeros((4, SMALL["intermediate_size"]))
    )
    targets = attach_slots(model, 2, MAX_RANK, jnp.float32)
    fill_slots(model, targets, adapters, MAX_RANK)
    projection = model.model.layers[0].mlp.down_proj
    x = jnp.ones((4, SMALL["intermediate_size"]))
    adapted = jax.jit(projection.__call__).lower(x)
    assert adapted.as_text().count("dot_general") == plain.as_text().count("dot_general")
    with token_adapters(jnp.asarray([0, -1, 0, 1], jnp.int32)):
        with_slots = np.asarray(projection(x))
    without = np.asarray(projection(x))
    assert np.abs(with_slots[1] - without[1]).max() == 0  # slot -1: the base model
    assert np.abs(with_slots[3] - without[3]).max() == 0  # an empty slot adds zero
    assert np.abs(with_slots[0] - without[0]).max() > 1e-3


def test_adapter_slots_shard_like_their_weights():
    """TP = 2: B splits where a weight splits its outputs (the fused q/k/v on its KV groups,
    the fused gate/up on its rows: each device adds the update of exactly the rows it
    computes), A where a row-split weight splits its inputs (o/down); the other factor is
    replicated. With fewer KV heads than devices q/k/v is split on its input: A is too."""
    from jax.sharding import PartitionSpec as P

    from tpu_plugin.models.registry import resolve_model_class
    from tpu_plugin.parallel import ShardingPlan
    from tpu_plugin.parallel.mesh import layout_from

    def specs_for(tp: int, **overrides):
        cfg = LlamaConfig(**{**SMALL, **overrides})
        cfg.architectures = ["LlamaForCausalLM"]
        model_class = resolve_model_class(cfg.architectures)

        def build():
            model = model_class(cfg, jnp.float32)
            attach_slots(model, 3, MAX_RANK, jnp.float32)
            return model

        state = nnx.state(nnx.eval_shape(build))
        return ShardingPlan(mesh=None, layout=layout_from(cfg, tp, False)).describe(state)

    specs = specs_for(2)
    layer = "model.layers.1"
    for proj in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        assert specs[f"{layer}.{proj}.weight"] == P("model", None, None), proj
        assert specs[f"{layer}.{proj}.lora.a"] == P(None, None, None), proj
        assert specs[f"{layer}.{proj}.lora.b"] == P("model", None, None, None), proj
    for proj in ("self_attn.o_proj", "mlp.down_proj"):
        assert specs[f"{layer}.{proj}.weight"] == P(None, "model")
        assert specs[f"{layer}.{proj}.lora.a"] == P(None, None, "model"), proj
        assert specs[f"{layer}.{proj}.lora.b"] == P(None, None, None), proj

    replicated_kv = specs_for(4, num_key_value_heads=2)  # 2 KV heads over 4 devices
    qkv = f"{layer}.self_attn.qkv_proj"
    assert replicated_kv[f"{qkv}.weight"] == P(None, None, "model")
    assert replicated_kv[f"{qkv}.lora.a"] == P(None, None, "model")
    assert replicated_kv[f"{qkv}.lora.b"] == P(None, None, None, None)


def test_mixed_adapter_batch_under_tensor_parallelism(tmp_path):
    """The mixed batch on 4 forced CPU devices (a fresh process, ``tests.models.lora_tp_check``)
    with parameters and adapter slots sharded as the runner shards them: TP = 2 splits the
    fused q/k/v on its KV groups and gate/up on its rows (B with them), TP = 4 has fewer KV
    heads than devices (q/k/v and its A split on the input); the logits equal TP = 1's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    dims = SMALL | dict(num_attention_heads=8)  # 2 KV heads: split at TP = 2, not at 4
    base = make_random_checkpoint(tmp_path / "llama", LlamaConfig(**dims), norm_noise=0.2)
    adapters = make_adapters(tmp_path, base)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["TPU_PLUGIN_DEVICE"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.models.lora_tp_check", str(base)]
        + [str(a) for a in adapters]
        + [json.dumps({"tp": [1, 2, 4]})],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    results = json.loads(lines[-1][len("RESULT ") :])
    reference = np.asarray(results["tp1"]["logits"])
    qkv_b = "model.layers.1.self_attn.qkv_proj.lora.b"
    gate_up_b = "model.layers.1.mlp.gate_up_proj.lora.b"
    qkv_a = "model.layers.1.self_attn.qkv_proj.lora.a"
    full = results["tp1"]["shards"]
    for tp in (2, 4):
        run = results[f"tp{tp}"]
        assert run["devices"] == 4
        rel = max(
            max_rel_error(got, want) for got, want in zip(run["logits"], reference, strict=True)
        )
        print(f"TP = {tp}: logits rel. error vs TP = 1 {rel:.2e}")
        assert rel <= 1e-4, f"TP = {tp}: rel. error {rel:.2e}"
        assert run["shards"][gate_up_b][0] == full[gate_up_b][0] // tp
    assert results["tp2"]["shards"][qkv_b][0] == full[qkv_b][0] // 2  # whole KV groups
    assert results["tp4"]["shards"][qkv_b] == full[qkv_b]  # KV replicated: B too ...
    assert results["tp4"]["shards"][qkv_a][-1] == full[qkv_a][-1] // 4  # ... A on the input
