"""A pooling model behind ``vllm serve --device cpu``: ``/v1/embeddings``, ``/score``,
``/rerank``, and bad requests.

One server (a random BERT with CLS pooling and Matryoshka dimensions 16/32/64, saved as a
sentence-transformers model): embeddings equal sentence-transformers' (cosine >= 0.9999),
score and rerank return the cosines of the embeddings, and every bad request gets vLLM's 400
error object while the next good request is still served.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import httpx
import numpy as np
import pytest
from transformers import BertConfig

from tests.e2e.server import vllm_server
from tests.models.embedding_models import (
    TEXTS,
    cosines,
    reference_embeddings,
    save_embedding_model,
    wordpiece_tokenizer,
)

MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert-serve")
    vocab = wordpiece_tokenizer(tmp / "wordpiece")
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_MODEL_LEN,
        pad_token_id=1,
    )
    config.matryoshka_dimensions = [16, 32, 64]
    return save_embedding_model(tmp / "bert", config, tmp / "wordpiece", "cls")


class Served(NamedTuple):
    base: str  # http://127.0.0.1:<port>
    model: str  # the served model's name (its path)


@pytest.fixture(scope="module")
def server(bert_dir) -> Iterator[Served]:
    args = ("--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(64 * 2**20))
    with vllm_server(bert_dir, "--dtype", "float32", *args) as running:
        yield Served(running.base, str(bert_dir))


def post(server: Served, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base + path, json={"model": server.model, **body}, timeout=120)


def embeddings(server: Served, texts: list[str], **fields) -> np.ndarray:
    response = post(server, "/v1/embeddings", {"input": texts, **fields})
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]])


@pytest.fixture(scope="module")
def reference(bert_dir) -> np.ndarray:
    return reference_embeddings(bert_dir, TEXTS)


def test_embeddings_match_sentence_transformers(server, reference):
    cos = cosines(embeddings(server, TEXTS), reference)
    print(f"/v1/embeddings: cosine vs sentence-transformers min {cos.min():.9f}")
    assert cos.min() >= 0.9999
    short = embeddings(server, TEXTS, dimensions=32)
    assert short.shape == (len(TEXTS), 32)
    assert cosines(short, reference[:, :32]).min() >= 0.9999


def test_score_and_rerank(server, reference):
    query, documents = TEXTS[0], TEXTS[1:]
    expected = cosines(np.repeat(reference[:1], len(documents), axis=0), reference[1:])
    response = post(server, "/score", {"queries": query, "documents": documents})
    assert response.status_code == 200, response.text
    scores = [row["score"] for row in sorted(response.json()["data"], key=lambda r: r["index"])]
    np.testing.assert_allclose(scores, expected, atol=1e-4)

    response = post(server, "/rerank", {"query": query, "documents": documents, "top_n": 2})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(np.argsort(-expected)[:2])
    np.testing.assert_allclose(
        [r["relevance_score"] for r in results], np.sort(expected)[::-1][:2], atol=1e-4
    )


# (case id, endpoint, body, a phrase the error message must contain)
BAD_REQUESTS = [
    ("no-input", "/v1/embeddings", {"input": []}, "at least one prompt"),
    ("empty-token-list", "/v1/embeddings", {"input": [[]]}, "cannot be empty"),
    ("too-long", "/v1/embeddings", {"input": "hello " * 600}, "maximum context length"),
    ("token-out-of-vocab", "/v1/embeddings", {"input": [[5, 6, 10**6]]}, "out of vocabulary"),
    ("dimensions-not-matryoshka", "/v1/embeddings", {"input": "hi", "dimensions": 7},
     "Matryoshka dimensions"),
    ("dimensions-zero", "/v1/embeddings", {"input": "hi", "dimensions": 0}, "range"),
    ("dimensions-too-large", "/v1/embeddings", {"input": "hi", "dimensions": 1000}, "range"),
    ("rerank-no-documents", "/rerank", {"query": "q", "documents": []}, "at least one"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("endpoint", "body", "phrase"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_gets_400_and_server_keeps_serving(server, reference, endpoint, body, phrase):
    response = post(server, endpoint, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert phrase.lower() in error["message"].lower(), error
    assert cosines(embeddings(server, TEXTS[:1]), reference[:1]).min() >= 0.9999
