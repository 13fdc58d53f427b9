"""``vllm serve <model> --device cpu`` end to end with the official ``openai`` client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import openai
import pytest
import requests

VLLM = os.path.join(os.path.dirname(sys.executable), "vllm")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_dir) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_PLUGIN_DEVICE")}
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vllm-serve-{port}.log"), "w")
    proc = subprocess.Popen(
        [
            VLLM,
            "serve",
            str(smollm2_dir),
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "8",
            "--kv-cache-memory-bytes",
            str(128 * 2**20),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log.name}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError(f"vllm serve not ready in 300 s; see {log.name}")
        yield base + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0)


def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_completion(client):
    out = client.completions.create(
        model=model_id(client), prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in out.choices[0].text


def test_chat_uses_the_chat_template(client):
    out = client.chat.completions.create(
        model=model_id(client),
        max_tokens=24,
        temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in out.choices[0].message.content


def test_streaming_chat(client):
    stream = client.chat.completions.create(
        model=model_id(client),
        max_tokens=24,
        temperature=0,
        stream=True,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 3 and "Paris" in "".join(pieces)


def test_sampling_with_seed_and_logprobs(client):
    kwargs = dict(
        model=model_id(client),
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0.8,
        top_p=0.9,
        seed=1234,
        logprobs=3,
        extra_body={"top_k": 20},
    )
    first, second = (client.completions.create(**kwargs) for _ in range(2))
    assert first.choices[0].text == second.choices[0].text
    top = first.choices[0].logprobs.top_logprobs
    assert len(top) == 12 and all(1 <= len(t) <= 4 for t in top)


def test_bad_requests_get_400_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_id(client), prompt="hi " * 2000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="min_p"):
        client.completions.create(
            model=model_id(client), prompt="hi", max_tokens=4, extra_body={"min_p": 0.1}
        )
    test_completion(client)
