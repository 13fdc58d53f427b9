"""Embeddings per second: the plugin (``vllm.LLM(runner="pooling")``) vs sentence-transformers.

    python benchmarks/bench_embed.py [--shape minilm|bge-base|qwen3-0.6b] [--texts 512]
                                     [--device cpu|gpu] [--repeats 3]

Both embed the same texts with the same random-weight model (a real architecture's shape,
saved as a sentence-transformers model, fp32 on CPU / bf16 on GPU), in the same run:
sentence-transformers ``encode`` (PyTorch, batches of ``--st-batch`` padded to their longest
text) and the plugin's engine after one warm-up pass over the same texts (its compilation is
reported apart). The embeddings of the two are compared too (cosine), so the speed is of the
same answer. Prints both rates and plugin / sentence-transformers.

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


def bench_sentence_transformers(
    model_dir: Path, texts: list[str], device: str, batch: int, repeats: int
) -> dict:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch_device = "cuda" if device == "gpu" else "cpu"
    dtype = torch.bfloat16 if device == "gpu" else torch.float32
    model = SentenceTransformer(str(model_dir), device=torch_device, model_kwargs={"dtype": dtype})
    model.encode(texts[:batch], batch_size=batch)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        embeddings = model.encode(texts, batch_size=batch, convert_to_numpy=True)
        if device == "gpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"emb_s": len(texts) / best, "times_s": times, "embeddings": np.asarray(embeddings)}


def bench_plugin(model_dir: Path, texts: list[str], device: str, repeats: int) -> dict:
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
    start = time.perf_counter()
    llm.embed(texts, use_tqdm=False)  # warm-up: compiles this schedule's step buckets
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = llm.embed(texts, use_tqdm=False)
        times.append(time.perf_counter() - start)
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    llm.llm_engine.engine_core.shutdown()
    return {
        "emb_s": len(texts) / min(times),
        "tokens_s": tokens / min(times),
        "times_s": times,
        "startup_s": startup,
        "first_pass_s": first,
        "tokens": tokens,
        "embeddings": np.stack([o.outputs.embedding for o in outputs]),
    }


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
    reference = bench_sentence_transformers(
        model_dir, texts, args.device, args.st_batch, args.repeats
    )
    plugin = bench_plugin(model_dir, texts, args.device, args.repeats)
    cos = cosines(plugin.pop("embeddings"), reference.pop("embeddings"))
    summary = {
        "shape": args.shape,
        "device": args.device,
        "texts": len(texts),
        "tokens": plugin["tokens"],
        "plugin": plugin,
        "sentence_transformers": reference,
        "ratio": plugin["emb_s"] / reference["emb_s"],
        "min_cosine": float(cos.min()),
    }
    print(json.dumps(summary, indent=2))
    print(
        f"{args.shape} on {args.device}, {len(texts)} texts ({plugin['tokens']} tokens): plugin "
        f"{plugin['emb_s']:.1f} emb/s, sentence-transformers {reference['emb_s']:.1f} emb/s, "
        f"ratio {summary['ratio']:.2f}x; min cosine {cos.min():.6f}"
    )


if __name__ == "__main__":
    main()
