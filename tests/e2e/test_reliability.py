"""The live server under bad input and load: clear 4xx answers, no leaks, authentication.

Runs against the session's SmolLM2 server (``conftest.py``: ``vllm serve --device cpu`` with an
API key). Every bad request must get a 4xx in vLLM's error shape and leave the server able to
serve the next good request; the reduced load test (``benchmarks/load_test.py`` has the full
one) checks exact token counts, survives mid-stream disconnects and finds every KV block free
afterwards.
"""

from __future__ import annotations

import httpx
import pytest

from benchmarks.load_test import run_load
from tests.e2e.server import Server

MAX_MODEL_LEN = 512  # conftest.SERVE_ARGS


def post(server: Server, path: str, body: dict | bytes, **headers: str) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(
            server.v1 + path,
            content=body,
            headers={**server.headers(), "Content-Type": "application/json", **headers},
            timeout=120,
        )
    return httpx.post(server.v1 + path, json=body, headers=server.headers(), timeout=120)


@pytest.fixture(scope="module")
def model(smollm2_server) -> str:
    response = httpx.get(smollm2_server.v1 + "/models", headers=smollm2_server.headers())
    return response.json()["data"][0]["id"]


def completion(model: str, **fields) -> dict:
    return {"model": model, "prompt": "The capital of France is", "max_tokens": 4, **fields}


def chat(model: str, **fields) -> dict:
    messages = [{"role": "user", "content": "Hi"}]
    return {"model": model, "messages": messages, "max_tokens": 4, **fields}


# (case id, endpoint, body builder, expected status, a word the error message must contain)
BAD_REQUESTS = [
    ("prompt-too-long", "/completions", lambda m: completion(m, prompt="hi " * 2000), 400,
     "maximum context length"),
    ("negative-temperature", "/completions", lambda m: completion(m, temperature=-1), 400,
     "temperature"),
    ("absurd-temperature", "/completions", lambda m: completion(m, temperature=1e30), 400,
     "temperature"),
    ("top-p-above-1", "/completions", lambda m: completion(m, top_p=1.5), 400, "top_p"),
    ("top-p-zero", "/completions", lambda m: completion(m, top_p=0), 400, "top_p"),
    ("negative-top-k", "/completions", lambda m: completion(m, top_k=-5), 400, "top_k"),
    ("absurd-presence-penalty", "/completions", lambda m: completion(m, presence_penalty=50),
     400, "presence_penalty"),
    ("chat-negative-temperature", "/chat/completions", lambda m: chat(m, temperature=-2), 400,
     "temperature"),
    ("unknown-model", "/completions", lambda m: completion("no-such-model"), 404,
     "does not exist"),
    ("malformed-json", "/completions", lambda m: b'{"model": "x", "prompt": "hi"', 400,
     "JSON"),
    ("chat-messages-not-a-list", "/chat/completions", lambda m: {"model": m, "messages": "hi"},
     400, "list"),
    ("non-utf8-bytes", "/completions",
     lambda m: b'{"model": "' + m.encode() + b'", "prompt": "\xff\xfe\xfd"}', 400, "pars"),
    ("empty-prompt", "/completions", lambda m: completion(m, prompt=""), 400, "prompt"),
    ("empty-token-list", "/completions", lambda m: completion(m, prompt=[]), 400, "prompt"),
    ("token-out-of-vocabulary", "/completions", lambda m: completion(m, prompt=[1, 10**7]),
     400, "vocabulary"),
    ("max-tokens-zero", "/completions", lambda m: completion(m, max_tokens=0), 400,
     "max_tokens"),
    ("max-tokens-negative", "/completions", lambda m: completion(m, max_tokens=-4), 400,
     "max_tokens"),
    ("max-tokens-huge", "/completions", lambda m: completion(m, max_tokens=10**9), 400,
     "max_tokens"),
    ("n-zero", "/completions", lambda m: completion(m, n=0), 400, "n must be"),
    ("n-too-large", "/completions", lambda m: completion(m, n=100_000), 400, "n must be"),
    ("logprobs-too-many", "/completions", lambda m: completion(m, logprobs=1000), 400,
     "logprobs"),
    ("logprobs-negative", "/completions", lambda m: completion(m, logprobs=-3), 400,
     "logprobs"),
    ("chat-top-logprobs-too-many", "/chat/completions",
     lambda m: chat(m, logprobs=True, top_logprobs=50), 400, "logprobs"),
]  # fmt: skip


def error_message(response: httpx.Response) -> str:
    """The message of vLLM's error object; FastAPI's ``detail`` only where vLLM has no handler.

    A body that is not UTF-8 fails in FastAPI's own body parsing, before vLLM's handlers, so it
    answers ``{"detail": ...}`` (still a 400).
    """
    body = response.json()
    if "detail" in body:
        return str(body["detail"])
    error = body["error"]
    assert error["code"] == response.status_code and error["type"], body
    return error["message"]


@pytest.mark.parametrize(
    "path, build, status, word", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_request_gets_4xx_and_the_next_request_succeeds(
    smollm2_server, model, path, build, status, word
):
    response = post(smollm2_server, path, build(model))
    assert response.status_code == status, response.text
    assert word.lower() in error_message(response).lower(), response.text
    good = post(smollm2_server, "/completions", completion(model, temperature=0))
    assert good.status_code == 200, good.text
    assert good.json()["usage"]["completion_tokens"] == 4


def test_api_key_is_enforced(smollm2_server, model):
    body = completion(model)
    missing = httpx.post(smollm2_server.v1 + "/completions", json=body, timeout=60)
    wrong = httpx.post(
        smollm2_server.v1 + "/completions",
        json=body,
        headers={"Authorization": "Bearer wrong-key"},
        timeout=60,
    )
    assert missing.status_code == wrong.status_code == 401
    assert post(smollm2_server, "/completions", body).status_code == 200


# slow: 33 s of load; the 4xx and abort tests above stay in the default suite
@pytest.mark.slow
def test_load_with_disconnects_leaves_no_blocks_behind(smollm2_server):
    """Reduced size (``python benchmarks/load_test.py --full`` is the full run)."""
    report = run_load(
        smollm2_server,
        requests=24,
        abort_fraction=0.1,
        extra_aborts=8,
        max_tokens=(2, 12),
        prompt_len=(4, 48),
    )
    print(report.summary())
    assert report.aborts == 2 + 8
    assert len(report.completed) == 24 - 2
    assert not report.wrong, report.wrong[:3]
    assert report.kv_usage_after == 0.0 and report.num_blocks > 0
    assert report.leaked_blocks == 0
    assert report.running_after == 0 and report.waiting_after == 0
    assert smollm2_server.process.poll() is None
