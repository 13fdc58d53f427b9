"""Step time of the torchax path against the native JAX port, same Llama, same run.

A random-weight Llama (built here with transformers) is loaded twice: as the plugin's flax
port and as vLLM's PyTorch ``LlamaForCausalLM`` through torchax. Both forwards have the
runner's contract ``(params, kv_caches, step) -> (kv_caches, logits)`` and are jitted the
same way; both are timed on the same ragged prefill step and the same decode step, calls
alternating, after a warm-up call compiles each. Prints a table and the torchax / native ratio.

    python benchmarks/bench_torchax_step.py [--layers 4 --hidden 512 --batch 8 --repeats 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TPU_PLUGIN_DEVICE", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

PAGE = 16


def make_llama(out: Path, layers: int, hidden: int, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=2048,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def random_step(lens: list[int], starts: list[int], pages_per_seq: int, num_pages: int, vocab):
    """Sequence ``i`` adds ``lens[i]`` random tokens at ``starts[i]`` on its own pages."""
    from tpu_plugin.tools.direct_steps import ragged_step

    rng = np.random.default_rng(0)
    tokens = [rng.integers(3, vocab, n) for n in lens]
    return ragged_step(tokens, starts, pages_per_seq, num_pages, PAGE)


def time_steps(forwards: dict, dims, step, num_pages: int, repeats: int) -> dict[str, tuple]:
    """``{name: (min ms, median ms)}`` of one jitted step per forward.

    Each forward is compiled by a warm-up call first; the timed calls alternate between the
    forwards, so load from other processes on a shared machine hits both alike, and the
    minimum is the least disturbed figure.
    """
    from tpu_plugin.tools.direct_steps import empty_kv_caches

    state = {}
    for name, (forward, params) in forwards.items():
        caches = empty_kv_caches(dims, num_pages, PAGE)
        jitted = jax.jit(forward, donate_argnums=(1,))
        caches, logits = jitted(params, caches, step)
        logits.block_until_ready()
        state[name] = [jitted, params, caches, []]
    for _ in range(repeats):
        for entry in state.values():
            jitted, params, caches, times = entry
            start = time.perf_counter()
            caches, logits = jitted(params, caches, step)
            logits.block_until_ready()
            times.append(time.perf_counter() - start)
            entry[2] = caches
    return {
        name: (1e3 * min(times), 1e3 * float(np.median(times)))
        for name, (_, _, _, times) in state.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from transformers import AutoConfig
    from vllm.engine.arg_utils import EngineArgs

    from tpu_plugin.models.loader import load_model
    from tpu_plugin.models.torchax import TorchaxModel
    from tpu_plugin.tools.direct_steps import native_forward

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_llama(Path(tmp) / "llama", args.layers, args.hidden, args.vocab)
        native = load_model(str(model_dir), AutoConfig.from_pretrained(model_dir), jnp.float32)
        forward, state = native_forward(native)
        config = EngineArgs(
            model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=2048
        ).create_engine_config()
        torchax_model = TorchaxModel(config)
        dims = torchax_model.kv_cache_dims

        pages_per_seq = -(-(args.prompt + 1) // PAGE)
        num_pages = pages_per_seq * args.batch
        steps = {
            f"prefill {args.batch}x{args.prompt}": random_step(
                [args.prompt] * args.batch, [0] * args.batch, pages_per_seq, num_pages, args.vocab
            ),
            f"decode {args.batch} at {args.prompt}": random_step(
                [1] * args.batch, [args.prompt] * args.batch, pages_per_seq, num_pages, args.vocab
            ),
        }
        print(
            f"Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, fp32, "
            f"JAX {jax.default_backend()} ({jax.__version__}); {args.repeats} alternating "
            "timed calls each, min (median) ms"
        )
        print("| step | native JAX | torchax | torchax / native (min) |")
        print("|---|---|---|---|")
        forwards = {
            "native": (forward, state),
            "torchax": (torchax_model.forward, torchax_model.params),
        }
        for name, step in steps.items():
            ms = time_steps(forwards, dims, step, num_pages, args.repeats)
            (n_min, n_med), (t_min, t_med) = ms["native"], ms["torchax"]
            print(
                f"| {name} | {n_min:.2f} ({n_med:.2f}) | {t_min:.2f} ({t_med:.2f}) "
                f"| {t_min / n_min:.2f}x |"
            )


if __name__ == "__main__":
    main()
