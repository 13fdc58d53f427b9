"""Pooling models through ``vllm.LLM`` (``embed``, ``score``) against sentence-transformers.

One engine per model family and pooling type, fp32, random weights: a Qwen3-Embedding-style
decoder (last token, normalised, Matryoshka dimensions), a Llama base model (mean, and per-token
embeddings), BERT (CLS) and XLM-RoBERTa (mean). The decoders run with a prefill chunk of 32
tokens, so the long text is pooled over several steps (the last token of the last chunk, the
mean over all chunks, every chunk's rows).
Every embedding must have cosine >= 0.9999 with sentence-transformers' on the same texts.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import BertConfig, LlamaConfig, Qwen3Config, XLMRobertaConfig

from tests.conftest import SMALL
from tests.models.embedding_models import (
    TEXTS,
    cosines,
    reference_embeddings,
    save_embedding_model,
    smollm2_tokenizer,
    wordpiece_tokenizer,
)

MIN_COSINE = 0.9999
CHUNK = 32  # --max-num-batched-tokens of the decoder engines: the long text takes 3 steps
ENCODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    pad_token_id=1,
)


def embed(llm, texts: list[str], **params) -> np.ndarray:
    from vllm import PoolingParams

    outputs = llm.embed(texts, pooling_params=PoolingParams(**params), use_tqdm=False)
    return np.stack([o.outputs.embedding for o in outputs])


def check_parity(label: str, got: np.ndarray, want: np.ndarray) -> None:
    cos = cosines(got, want)
    print(
        f"{label}: cosine vs sentence-transformers min {cos.min():.9f} (1 - cos max "
        f"{1 - cos.min():.1e}) over {len(cos)} rows"
    )
    assert cos.min() >= MIN_COSINE, f"{label}: cosines {cos}"


@pytest.fixture(scope="module")
def decoder_tokenizer(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    return out, smollm2_tokenizer(smollm2_dir, out)


def test_qwen3_last_token_chunked_and_matryoshka(tmp_path, make_llm, decoder_tokenizer):
    """Qwen3-Embedding's layout: base-model weights under ``Qwen3ForCausalLM``, last-token
    pooling, normalised, Matryoshka ``dimensions``; prefix caching on (vLLM's default)."""
    tokenizer_dir, vocab = decoder_tokenizer
    config = Qwen3Config(**{**SMALL, "vocab_size": vocab}, head_dim=16)
    config.matryoshka_dimensions = [16, 32, 64]
    model_dir = save_embedding_model(
        tmp_path / "qwen3-emb",
        config,
        tokenizer_dir,
        "lasttoken",
        architectures=["Qwen3ForCausalLM"],
    )
    want = reference_embeddings(model_dir, TEXTS)
    llm = make_llm(model_dir, runner="pooling", dtype="float32", max_num_batched_tokens=CHUNK)
    assert len(llm.get_tokenizer()(TEXTS[2]).input_ids) > 2 * CHUNK  # really chunked
    check_parity("qwen3 LAST (chunked)", embed(llm, TEXTS), want)
    # The same texts again: now the prompts' blocks come from the prefix cache.
    check_parity("qwen3 LAST (prefix cache)", embed(llm, TEXTS), want)

    short = embed(llm, TEXTS, dimensions=16)
    assert short.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, rtol=1e-5)
    check_parity("qwen3 LAST dimensions=16", short, want[:, :16])
    raw = embed(llm, TEXTS, use_activation=False)  # no normalisation
    assert np.linalg.norm(raw, axis=1).min() > 1.5
    check_parity("qwen3 LAST use_activation=False", raw, want)


@pytest.fixture
def llama_embedding_model(tmp_path, decoder_tokenizer):
    """A Llama base model (``LlamaModel``: no LM head) with mean pooling."""
    tokenizer_dir, vocab = decoder_tokenizer
    config = LlamaConfig(**{**SMALL, "vocab_size": vocab})
    return save_embedding_model(tmp_path / "llama-emb", config, tokenizer_dir, "mean")


def test_llama_mean_over_chunks(make_llm, llama_embedding_model):
    """Mean pooling with the long text split into prefill chunks: the host sums every
    chunk's rows before dividing."""
    want = reference_embeddings(llama_embedding_model, TEXTS)
    llm = make_llm(
        llama_embedding_model,
        runner="pooling",
        dtype="float32",
        enable_chunked_prefill=True,
        max_num_batched_tokens=CHUNK,
    )
    check_parity("llama MEAN (chunked)", embed(llm, TEXTS), want)


def test_llama_token_embeddings_over_chunks(make_llm, llama_embedding_model):
    """Per-token embeddings (vLLM's ALL token pooling, ``token_embed``; vLLM serves one
    pooling task per engine): every token's row, gathered over the prefill chunks."""
    llm = make_llm(
        llama_embedding_model,
        runner="pooling",
        dtype="float32",
        enable_chunked_prefill=True,
        max_num_batched_tokens=CHUNK,
        pooler_config={"task": "token_embed"},
    )
    outputs = llm.encode(TEXTS, pooling_task="token_embed", use_tqdm=False)
    tokens = reference_embeddings(llama_embedding_model, TEXTS, output_value="token_embeddings")
    for text, out, ref in zip(TEXTS, outputs, tokens, strict=True):
        got = out.outputs.data.numpy()
        assert got.shape == tuple(ref.shape), text
        check_parity(f"llama token_embed ({len(got)} tokens)", got, ref.numpy())


@pytest.mark.parametrize(
    ("name", "pooling"),
    [
        pytest.param("bert", "cls", id="bert"),
        # slow (29 s): the same encoder path as BERT, with RoBERTa's position offset
        pytest.param("xlm-roberta", "mean", id="xlm-roberta", marks=pytest.mark.slow),
    ],
)
def test_encoders_and_score(tmp_path, make_llm, name, pooling):
    """BERT (CLS) and XLM-RoBERTa (mean) encoders; ``LLM.score`` ranks documents by the
    cosine of their embeddings (a bi-encoder), as sentence-transformers does."""
    tokenizer_dir = tmp_path / "wordpiece"
    vocab = wordpiece_tokenizer(tokenizer_dir)
    if name == "bert":
        config = BertConfig(**ENCODER, vocab_size=vocab, type_vocab_size=2)
    else:  # as released XLM-R configs: 514 positions (from pad + 1), their type named
        config = XLMRobertaConfig(
            **{**ENCODER, "max_position_embeddings": 514},
            vocab_size=vocab,
            type_vocab_size=1,
            position_embedding_type="absolute",
        )
    model_dir = save_embedding_model(tmp_path / name, config, tokenizer_dir, pooling)
    want = reference_embeddings(model_dir, TEXTS)
    llm = make_llm(model_dir, runner="pooling", dtype="float32")
    tokenizer = llm.get_tokenizer()
    assert tokenizer.unk_token_id not in tokenizer(TEXTS[0]).input_ids  # real word pieces
    check_parity(f"{name} {pooling.upper()}", embed(llm, TEXTS), want)

    query, documents = TEXTS[0], TEXTS[1:]
    scores = [o.outputs.score for o in llm.score(query, documents, use_tqdm=False)]
    expected = cosines(np.repeat(want[:1], len(documents), axis=0), want[1:])
    np.testing.assert_allclose(scores, expected, atol=1e-4)
