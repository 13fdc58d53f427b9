"""``vllm serve <model> --device cpu`` end to end with the official ``openai`` client."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture(scope="module")
def client(smollm2_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=smollm2_server.v1, api_key=smollm2_server.api_key, max_retries=0)


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
    with pytest.raises(openai.BadRequestError, match="thinking_token_budget"):
        client.completions.create(
            model=model_id(client),
            prompt="hi",
            max_tokens=4,
            extra_body={"thinking_token_budget": 8},
        )
    test_completion(client)
