"""Every kernel of one decode step, named: an XLA dump of the decode program next to its trace.

    python3 benchmarks/decode_hlo.py [--smoke] [--batches 1 32 128] [--context 640]

Builds the engine's own forward program (``model_runner.jitted_forward``, through
``tpu_plugin.tools.hlo_inventory.decode_engine``) for a Llama-3-8B-shaped model in bf16 with
random weights on this process's devices, compiles one decode program per batch size with
``XLA_FLAGS=--xla_dump_to=$OUT/xla_dump`` (text, forward programs only), runs each ``--steps``
times under the JAX profiler, and joins the two: every kernel event of the trace is matched to
the HLO instruction that launched it (its ``hlo_op`` stat), and every instruction is named by
its role and the plugin functions its ops come from (``hlo_inventory.inventory``). Writes
``$OUT/decode_hlo/inventory_b<batch>.json`` (every kernel: role, sources, weights read, time
per step) and ``$OUT/decode_hlo/summary.md`` (per role: kernels, ms per step).

``--smoke`` uses a 2-layer model and JAX CPU (any host): the dump, the inventory and the trace
join all run; the CPU runtime's events carry the same ``hlo_op`` stats. ``--model`` takes any
config directory or JSON instead.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

OUT = os.environ.get("OUT", "/tmp")


def llama_8b_config(smoke: bool) -> dict:
    """The config JSON of the 8B shape (or a 2-layer one for ``--smoke``)."""
    from transformers import LlamaConfig

    if smoke:
        cfg = LlamaConfig(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        )
    else:
        cfg = LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg.to_dict()


def random_like(abstract: object, seed: int = 0) -> object:
    """Concrete arrays for a tree of ``ShapeDtypeStruct`` with shardings: N(0, 0.02)
    for floating leaves, zeros otherwise, created on the devices (no host copy)."""
    import jax
    import jax.numpy as jnp

    leaves, tree = jax.tree.flatten(abstract)
    out = []
    for i, leaf in enumerate(leaves):

        def make(key: jax.Array, leaf: jax.ShapeDtypeStruct = leaf) -> jax.Array:
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                return (jax.random.normal(key, leaf.shape, jnp.float32) * 0.02).astype(leaf.dtype)
            return jnp.zeros(leaf.shape, leaf.dtype)

        out.append(jax.jit(make, out_shardings=leaf.sharding)(jax.random.key(seed + i)))
    return jax.tree.unflatten(tree, out)


def decode_step(engine: object, step: object, batch: int, context: int) -> object:
    """``step`` (the engine's dummy step of the bucket) as ``batch`` real decodes at
    ``context`` tokens of KV each, on distinct pages (as ``step_profile`` builds it)."""
    import jax
    import numpy as np

    width = step.attention.page_indices.shape[1]
    pages = (np.arange(batch * width, dtype=np.int32) % engine.num_blocks).reshape(batch, width)
    seqs = step.attention.kv_lens.shape[0]
    kv_lens = np.zeros(seqs, np.int32)
    kv_lens[:batch] = context
    starts = np.minimum(np.arange(seqs + 1, dtype=np.int32), batch)
    table = np.zeros((seqs, width), np.int32)
    table[:batch] = pages
    attention = step.attention._replace(
        kv_lens=kv_lens,
        page_indices=table,
        query_start_loc=starts,
        num_seqs=np.array([batch], np.int32),
    )
    positions = np.full(step.positions.shape, context - 1, np.int32)
    return jax.device_put(step._replace(attention=attention, positions=positions))


def profile(compiled: object, args: tuple, steps: int) -> tuple[list, float]:
    """Kernel events ``(hlo_op, ns)`` of ``steps`` runs and the wall ms per step."""
    import jax

    from tpu_plugin.tools import hlo_trace

    params, kv, step = args
    for _ in range(2):
        kv, logits = compiled(params, kv, step)
    jax.block_until_ready(logits)
    start = time.perf_counter()
    for _ in range(steps):
        kv, logits = compiled(params, kv, step)
    jax.block_until_ready(logits)
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    trace_dir = tempfile.mkdtemp(prefix="decode-trace-")
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            kv, logits = compiled(params, kv, step)
        jax.block_until_ready(logits)
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    events = hlo_trace.trace_events(files[0]) if files else []
    return events, wall_ms


def run(args: argparse.Namespace) -> dict:
    from tpu_plugin.tools import hlo_inventory, hlo_trace, tpu_aot

    out_dir = os.path.join(OUT, "decode_hlo")
    os.makedirs(out_dir, exist_ok=True)
    if args.model:
        model = args.model
    else:
        model = tempfile.mkdtemp(prefix="decode-hlo-model-")
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump(llama_8b_config(args.smoke), f)
    report: dict = {"batches": {}}
    lines = []
    for batch in args.batches:
        options = tpu_aot.EngineOptions(
            model=model,
            max_model_len=2 * args.context,
            max_num_seqs=max(args.batches),
            max_num_batched_tokens=max(max(args.batches), 256),
            dtype="bfloat16",
        )
        start = time.perf_counter()
        engine, step, lower = hlo_inventory.decode_engine(
            options, batch=batch, context=args.context
        )
        compiled = lower().compile()
        compile_s = time.perf_counter() - start
        text = compiled.as_text()
        with open(os.path.join(out_dir, f"decode_b{batch}.hlo.txt"), "w") as f:
            f.write(text)
        kernels = hlo_inventory.inventory(text)
        params = random_like(engine.params)
        kv = random_like(engine.kv_caches)
        events, wall_ms = profile(
            compiled, (params, kv, decode_step(engine, step, batch, args.context)), args.steps
        )
        timing = hlo_trace.join_trace(kernels, events, args.steps)
        layers = engine.runner.num_layers
        summary = hlo_inventory.summary(kernels, layers)
        report["batches"][str(batch)] = {
            "compile_s": compile_s,
            "wall_ms_per_step": wall_ms,
            "kernel_events_per_step": len(events) / args.steps,
            "summary": summary,
            **timing,
        }
        with open(os.path.join(out_dir, f"inventory_b{batch}.json"), "w") as f:
            json.dump(
                {
                    "report": report["batches"][str(batch)],
                    "kernels": [vars(k) for k in kernels],
                },
                f,
                indent=1,
            )
        lines.append(hlo_inventory.format_table(kernels, layers, f"batch {batch}"))
        lines.append("")
        lines.append(f"wall {wall_ms:.2f} ms/step; traced kernel time by role (ms/step):")
        for role, ms in timing["ms_per_step_by_role"].items():
            lines.append(f"- {role}: {ms:.3f}")
        if timing["unmatched_ms_per_step"]:
            top = list(timing["unmatched_ms_per_step"].items())[:5]
            lines.append(
                "- not matched to an instruction: " + ", ".join(f"{n} {v:.3f}" for n, v in top)
            )
        lines.append("")
        del params, kv, compiled, engine
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--model", default=None, help="config directory or JSON (default 8B)")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--context", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    args.batches = args.batches or ([1, 4] if args.smoke else [1, 32, 128])
    args.context = args.context or (64 if args.smoke else 640)
    if args.smoke:
        os.environ.setdefault("TPU_PLUGIN_DEVICE", "cpu")
    os.environ.setdefault("TPU_PLUGIN_DEVICE", "gpu")
    # The dump is configured before JAX starts; only the forward programs are written.
    dump = os.path.join(OUT, "xla_dump")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_dump_to={dump} --xla_dump_hlo_as_text "
        "--xla_dump_hlo_module_re=.*jit_forward.*"
    ).strip()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    report = run(args)
    with open(os.path.join(OUT, "decode_hlo", "report.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
