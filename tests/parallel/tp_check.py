"""Sharded vs unsharded greedy decoding at the JAX level, run in a fresh process.

``python -m tests.parallel.tp_check MODEL_DIR '{"tp": [1, 2], "ep": [2]}'`` prints one JSON
line (keys ``tp1``, ``tp2``, ``ep2``): for every TP size (and every expert-parallel size, experts
split over the devices) the greedy tokens of a few prompts (prefill, then decode steps through
paged KV caches, sharded as the runner shards them) and every parameter's ``PartitionSpec`` and
per-device shard shape. A fresh process is needed because JAX fixes its CPU device count
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) when it first initialises.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TPU_PLUGIN_DEVICE", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from tpu_plugin.layers.attention import AttentionMetadata  # noqa: E402
from tpu_plugin.models import quantization  # noqa: E402
from tpu_plugin.models.llama import head_dim_of  # noqa: E402
from tpu_plugin.models.loader import load_model  # noqa: E402
from tpu_plugin.parallel.mesh import build_mesh, layout_from  # noqa: E402
from tpu_plugin.parallel.sharding import ShardingPlan  # noqa: E402

PAGE = 16


def greedy(model_dir: str, tp: int, ep: bool, prompts: list[list[int]], steps: int) -> dict:
    """Greedy continuations of ``prompts`` on a ``tp``-device mesh, and the parameter specs."""
    jax.config.update("jax_platforms", "cpu")
    cfg = AutoConfig.from_pretrained(model_dir)
    plan = ShardingPlan(build_mesh(tp), layout_from(cfg, tp, ep))
    qc = getattr(cfg, "quantization_config", None)  # a quantized checkpoint (compressed-tensors)
    quant = quantization.from_config(cfg, qc["quant_method"], "auto") if qc else None
    model = load_model(model_dir, cfg, jnp.float32, quant=quant)
    graphdef, params = nnx.split(model)
    specs = plan.describe(params)
    params = plan.shard_params(params)
    shards = {
        ".".join(str(p) for p in path): list(var.get_value().addressable_shards[0].data.shape)
        for path, var in nnx.to_flat_state(params)
    }

    @jax.jit
    def forward(params, caches, ids, positions, md):
        m = nnx.merge(graphdef, params)
        caches, hidden = m(caches, ids, positions, md)
        logits = plan.logits(m.compute_logits(hidden[-1:]))
        return plan.constrain_kv(caches), logits

    pages = -(-(max(map(len, prompts)) + steps) // PAGE)
    shape = (pages, PAGE, cfg.num_key_value_heads, head_dim_of(cfg))
    out = []
    for prompt in prompts:
        kv = jax.device_put(jnp.zeros(shape, jnp.float32), plan.kv_sharding(shape))
        caches = [(kv, kv.copy()) for _ in range(cfg.num_hidden_layers)]
        tokens, start = list(prompt), 0
        for _ in range(steps):
            n = len(tokens)
            md = AttentionMetadata(
                slot_mapping=jnp.arange(start, n),
                kv_lens=jnp.array([n]),
                page_indices=jnp.arange(pages)[None],
                query_start_loc=jnp.array([0, n - start]),
                num_seqs=jnp.array([1]),
            )
            ids = jnp.array(tokens[start:])
            caches, logits = forward(params, caches, ids, jnp.arange(start, n), md)
            tokens.append(int(np.argmax(np.asarray(logits)[0])))
            start = n
        out.append(tokens[len(prompt) :])
    kv_spec = str(caches[0][0].sharding.spec)
    return {
        "tokens": out,
        "specs": {k: str(v) for k, v in specs.items()},
        "shards": shards,
        "kv_spec": kv_spec,
        "devices": len(jax.devices()),
    }


def main() -> None:
    model_dir, options = sys.argv[1], json.loads(sys.argv[2])
    rng = np.random.default_rng(options.get("seed", 1))
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    prompts = [rng.integers(3, vocab, n).tolist() for n in options.get("lengths", [5, 19, 33])]
    steps = options.get("steps", 8)
    results = {f"tp{tp}": greedy(model_dir, tp, False, prompts, steps) for tp in options["tp"]}
    for ep in options.get("ep", []):
        results[f"ep{ep}"] = greedy(model_dir, ep, True, prompts, steps)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
