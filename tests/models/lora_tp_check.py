"""Multi-LoRA under tensor parallelism at the JAX level, run in a fresh process.

``python -m tests.models.lora_tp_check BASE_DIR ADAPTER_DIR... '{"tp": [1, 2, 4]}'`` prints one
JSON line: for every TP size the last-position logits of one mixed-adapter ragged step
(``tests.models.test_lora_forward``'s prompts and slot choice) with the parameters and the
adapter slots sharded as the runner shards them, and every adapter slot's per-device shard
shape. A fresh process because JAX fixes its CPU device count when it first initialises.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TPU_PLUGIN_DEVICE", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from tests.conftest import SMALL, random_prompts  # noqa: E402
from tests.models.test_lora_forward import CHOICE, LENGTHS, MAX_RANK, fill_slots  # noqa: E402
from tpu_plugin.layers.lora import attach_slots, token_adapters  # noqa: E402
from tpu_plugin.models.llama import head_dim_of  # noqa: E402
from tpu_plugin.models.loader import load_model  # noqa: E402
from tpu_plugin.parallel.mesh import build_mesh, layout_from  # noqa: E402
from tpu_plugin.parallel.sharding import ShardingPlan  # noqa: E402
from tpu_plugin.tools.direct_steps import PAGE_SIZE, ragged_step  # noqa: E402


def mixed_step_logits(base: str, adapters: list[str], tp: int) -> tuple[list, dict]:
    jax.config.update("jax_platforms", "cpu")
    cfg = AutoConfig.from_pretrained(base)
    plan = ShardingPlan(build_mesh(tp), layout_from(cfg, tp, False))
    model = load_model(base, cfg, jnp.float32)
    targets = attach_slots(model, len(adapters) + 1, MAX_RANK, jnp.float32)
    fill_slots(model, targets, adapters, MAX_RANK)
    graphdef, params = nnx.split(model)
    params = plan.shard_params(params)
    shards = {
        ".".join(str(p) for p in path): list(var.get_value().addressable_shards[0].data.shape)
        for path, var in nnx.to_flat_state(params)
        if "lora" in path
    }

    prompts = random_prompts(SMALL["vocab_size"], LENGTHS)
    pages_per_seq = -(-max(LENGTHS) // PAGE_SIZE)
    num_pages = pages_per_seq * len(prompts)
    step = ragged_step(prompts, [0] * len(prompts), pages_per_seq, num_pages)
    slots = np.full(step.input_ids.shape[0], -1, np.int32)
    slots[: sum(LENGTHS)] = np.repeat(CHOICE, LENGTHS)
    shape = (num_pages, PAGE_SIZE, cfg.num_key_value_heads, head_dim_of(cfg))
    kv = jax.device_put(jnp.zeros(shape, jnp.float32), plan.kv_sharding(shape))
    caches = [(kv, kv.copy()) for _ in range(cfg.num_hidden_layers)]

    @jax.jit
    def forward(params, caches, ids, positions, md, slots, indices):
        m = nnx.merge(graphdef, params)
        with token_adapters(slots):
            _, hidden = m(caches, ids, positions, md)
        return plan.logits(m.compute_logits(hidden[indices]))

    logits = forward(
        params,
        caches,
        step.input_ids,
        step.positions,
        step.attention,
        jnp.asarray(slots),
        step.logits_indices,
    )
    return np.asarray(logits)[: len(prompts)].tolist(), shards


def main() -> None:
    *dirs, options = sys.argv[1:]
    base, adapters = dirs[0], dirs[1:]
    result = {}
    for tp in json.loads(options)["tp"]:
        logits, shards = mixed_step_logits(base, adapters, tp)
        result[f"tp{tp}"] = {"devices": len(jax.devices()), "logits": logits, "shards": shards}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
