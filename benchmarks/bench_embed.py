"""Embeddings per second: the plugin (``vllm.LLM(runner="pooling")``) vs sentence-transformers.

    python benchmarks/bench_embed.py [--shape minilm|bge-base|qwen3-0.6b] [--texts 512]
                                     [--device cpu|gpu] [--repeats 3]

Both embed the same texts with the same random-weight model (a real architecture's shape,
saved as a sentence-transformers model, fp32 on CPU / bf16 on GPU), in the same run:
sentence-transformers ``encode`` (PyTorch, batches of ``--st-batch`` padded to their longest
text) and the plugin's engine after one warm-up pass over the same texts (its compilation is
reported apart). The two alternate ``--repeats`` times, so both see the same load on a shared
machine. The embeddings of the two are compared too (cosine), so the speed is of the same
answer. Prints best and median rates and plugin / sentence-transformers.

Shapes: ``minilm`` = all-MiniLM-L6-v2 (BERT, 6 x 384, mean pooling), ``bge-base`` = BERT-base
(12 x 768, CLS), ``qwen3-0.6b`` = Qwen3-Embedding-0.6B (28 x 1024 decoder, last token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "minilm": dict(
        family="bert",
        pooling="mean",
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=12,
    ),
    "bge-base": dict(
        family="bert",
        pooling="cls",
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
    ),
    "qwen3-0.6b": dict(
        family="qwen3",
        pooling="lasttoken",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    ),
}


def make_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` texts of 8 to 120 words from the test vocabulary (every word one token)."""
    import numpy as np

    from tests.models.embedding_models import WORDS

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(8, 121)))) for _ in range(n)]


def build_model(shape: str, out: Path) -> Path:
    """The shape's random-weight sentence-transformers model in ``out`` (built once)."""
    from transformers import BertConfig, Qwen3Config

    from tests.models.embedding_models import (
        save_embedding_model,
        smollm2_tokenizer,
        wordpiece_tokenizer,
    )

    spec = dict(SHAPES[shape])
    family, pooling = spec.pop("family"), spec.pop("pooling")
    model_dir = out / shape
    if (model_dir / "modules.json").exists():
        return model_dir
    tokenizer_dir = out / f"{shape}-tokenizer"
    if family == "bert":
        vocab = wordpiece_tokenizer(tokenizer_dir)
        config = BertConfig(**spec, vocab_size=vocab, max_position_embeddings=512, pad_token_id=1)
        architectures = None
    else:
        from tpu_plugin.tools.build_smollm2 import build

        vocab = smollm2_tokenizer(build(), tokenizer_dir)
        config = Qwen3Config(**spec, vocab_size=vocab, max_position_embeddings=2048)
        architectures = ["Qwen3ForCausalLM"]
    # A small init keeps deep random decoders' activations finite in bf16.
    return save_embedding_model(
        model_dir,
        config,
        tokenizer_dir,
        pooling,
        architectures=architectures,
        init_scale=0.02,
    )


def sentence_transformers_runner(model_dir: Path, device: str, batch: int):
    """``run(texts) -> embeddings`` through sentence-transformers ``encode`` (warmed up)."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch_device = "cuda" if device == "gpu" else "cpu"
    dtype = torch.bfloat16 if device == "gpu" else torch.float32
    model = SentenceTransformer(str(model_dir), device=torch_device, model_kwargs={"dtype": dtype})

    def run(texts: list[str]) -> np.ndarray:
        out = model.encode(texts, batch_size=batch, convert_to_numpy=True)
        if device == "gpu":
            torch.cuda.synchronize()
        return np.asarray(out, np.float32)

    run(["warm-up"] * batch)
    return run


def plugin_runner(model_dir: Path, device: str):
    """``(run, llm, startup_s)``: ``run(texts) -> embeddings`` through ``LLM.embed``."""
    import numpy as np

    os.environ["TPU_PLUGIN_DEVICE"] = device
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        runner="pooling",
        dtype="bfloat16" if device == "gpu" else "float32",
        max_model_len=512,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        kv_cache_memory_bytes=2 << 30,
    )
    startup = time.perf_counter() - start

    def run(texts: list[str]) -> np.ndarray:
        outputs = llm.embed(texts, use_tqdm=False)
        return np.stack([o.outputs.embedding for o in outputs]).astype(np.float32)

    return run, llm, startup


def timed(run, texts: list[str]):
    start = time.perf_counter()
    out = run(texts)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="minilm")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--st-batch", type=int, default=32, help="sentence-transformers batch")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-embed")
    args = parser.parse_args()
    os.environ.setdefault("TPU_PLUGIN_PRECOMPILE", "0")  # the warm-up pass compiles instead

    from tests.models.embedding_models import cosines

    model_dir = build_model(args.shape, args.out)
    texts = make_texts(args.texts)
    reference_run = sentence_transformers_runner(model_dir, args.device, args.st_batch)
    plugin_run, llm, startup = plugin_runner(model_dir, args.device)
    first_pass, _ = timed(plugin_run, texts)  # compiles this schedule's step buckets
    # Alternate the two, so that both see the same load on a shared machine.
    times: dict[str, list[float]] = {"plugin": [], "sentence_transformers": []}
    for _ in range(args.repeats):
        seconds, reference = timed(reference_run, texts)
        times["sentence_transformers"].append(seconds)
        seconds, ours = timed(plugin_run, texts)
        times["plugin"].append(seconds)
    tokens = sum(len(ids) for ids in llm.get_tokenizer()(texts).input_ids)
    llm.llm_engine.engine_core.shutdown()
    cos = cosines(ours, reference)
    rates = {
        name: {"best_emb_s": len(texts) / min(t), "median_emb_s": len(texts) / median(t)}
        for name, t in times.items()
    }
    summary = {
        "shape": args.shape,
        "device": args.device,
        "texts": len(texts),
        "tokens": tokens,
        "times_s": times,
        "rates": rates,
        "plugin_startup_s": startup,
        "plugin_first_pass_s": first_pass,
        "ratio_best": rates["plugin"]["best_emb_s"] / rates["sentence_transformers"]["best_emb_s"],
        "ratio_median": rates["plugin"]["median_emb_s"]
        / rates["sentence_transformers"]["median_emb_s"],
        "min_cosine": float(cos.min()),
    }
    print(json.dumps(summary, indent=2))
    ours_rate, ref_rate = rates["plugin"], rates["sentence_transformers"]
    print(
        f"{args.shape} on {args.device}, {len(texts)} texts ({tokens} tokens), best / median of "
        f"{args.repeats}: plugin {ours_rate['best_emb_s']:.1f} / {ours_rate['median_emb_s']:.1f} "
        f"emb/s, sentence-transformers {ref_rate['best_emb_s']:.1f} / "
        f"{ref_rate['median_emb_s']:.1f} emb/s, ratio {summary['ratio_best']:.2f}x / "
        f"{summary['ratio_median']:.2f}x; min cosine {cos.min():.6f}"
    )


if __name__ == "__main__":
    main()
