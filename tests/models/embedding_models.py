"""Small random-weight embedding models, saved as sentence-transformers models.

Each is a real architecture from transformers (``AutoModel``: the base model, no LM head, as
embedding checkpoints such as Qwen3-Embedding are saved) wrapped by sentence-transformers with
a ``Pooling`` module and, optionally, ``Normalize``; vLLM reads the pooling type from
``modules.json`` / ``1_Pooling``, and sentence-transformers is the reference. Nothing is
downloaded: decoders reuse the embedded SmolLM2's tokenizer (its chat template dropped, or
sentence-transformers 6 would wrap every text in it), encoders get a small WordPiece tokenizer
built here.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

# sentence-transformers' pooling_mode -> vLLM's seq_pooling_type
POOLING_MODES = {"lasttoken": "LAST", "mean": "MEAN", "cls": "CLS"}

# Texts the tests embed: different lengths, one far longer than a small prefill chunk.
TEXTS = [
    "The capital of France is Paris.",
    "hello world",
    "Embeddings map text to vectors; similar texts get similar vectors. " * 6,
    "x",
    "A quick brown fox jumps over the lazy dog near the river bank.",
]

WORDS = (
    "the capital of france is paris hello world embeddings map text to vectors similar get "
    "a quick brown fox jumps over lazy dog near river bank what where city tell me about "
    "which document answers question this that it"
).split()


def smollm2_tokenizer(smollm2_dir: Path, out_dir: Path) -> int:
    """Saves SmolLM2's tokenizer without its chat template; returns its vocabulary size."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(out_dir)
    return len(tokenizer)


def wordpiece_tokenizer(out_dir: Path) -> int:
    """A small BERT WordPiece tokenizer (``[CLS] ... [SEP]``); returns its vocabulary size.

    Ids 0-3 are ``[CLS] [PAD] [SEP] [UNK]``, the places XLM-RoBERTa gives ``<s> <pad> </s>
    <unk>``, so one tokenizer serves both families (pad id 1). Built with ``tokenizers``
    (transformers 5's ``BertTokenizerFast(vocab_file=...)`` keeps only its special tokens).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]", *WORDS, *chars]
    pieces += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    tokenizer.save_pretrained(out_dir)
    return len(vocab)


def save_embedding_model(
    out_dir: Path,
    config,
    tokenizer_dir: Path,
    pooling_mode: str,
    *,
    normalize: bool = True,
    architectures: list[str] | None = None,
    seed: int = 0,
    init_scale: float = 0.5,
) -> Path:
    """A random ``AutoModel`` of ``config`` + sentence-transformers pooling, in ``out_dir``.

    ``architectures`` overrides ``config.json``'s (Qwen3-Embedding ships the base model's
    weights under ``Qwen3ForCausalLM``). ``init_scale`` is the weights' init standard
    deviation: large, so that embeddings of different texts are far apart.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    config.initializer_range = init_scale
    model = AutoModel.from_config(config, dtype=torch.float32)
    hf_dir = out_dir.parent / f"{out_dir.name}-hf"
    model.save_pretrained(hf_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(hf_dir)
    modules = [Transformer(str(hf_dir)), Pooling(config.hidden_size, pooling_mode=pooling_mode)]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(out_dir))
    if architectures is not None:
        path = out_dir / "config.json"
        saved = json.loads(path.read_text())
        saved["architectures"] = architectures
        path.write_text(json.dumps(saved, indent=2))
    return out_dir


def reference_embeddings(model_dir: Path, texts: list[str], **encode_args):
    """sentence-transformers' embeddings of ``texts`` (fp32, CPU), ``[len(texts), dim]``.

    ``output_value="token_embeddings"`` gives each text's per-token rows instead (a list).
    """
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    if encode_args:
        return model.encode(texts, batch_size=len(texts), **encode_args)
    return model.encode(texts, convert_to_numpy=True, batch_size=len(texts))


def cosines(got, want):
    """Row-wise cosine similarity of two ``[n, dim]`` arrays (float64)."""
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
