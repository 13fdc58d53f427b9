"""Structured output through ``vllm serve --device cpu`` and the ``openai`` client.

The model has random weights, so nothing but the grammar (vLLM's xgrammar backend, its token
bitmask applied in the plugin's jitted sampler) can make the output valid. Requests are sent
concurrently, so grammar rows share batches with each other and with free-running rows.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.e2e.server import vllm_server
from tests.e2e.test_sampling_params import make_tokenized_random_llama

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["ok", "color", "size"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(smollm2_dir, tmp_path_factory):
    model = make_tokenized_random_llama(
        tmp_path_factory.getbasetemp() / "tokenized-llama", smollm2_dir
    )
    args = (
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "16",
        "--kv-cache-memory-bytes",
        str(64 * 2**20),
        # Random weights would pad JSON with whitespace until max_tokens: vLLM's option to
        # allow none between JSON tokens keeps the outputs short.
        "--structured-outputs-config",
        json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    )
    # Buckets compile on first use: precompiling all of them would take longer than the test.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TPU_PLUGIN_PRECOMPILE", "0")
        with vllm_server(model, *args) as server:
            yield openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0)


def complete(client, prompt: str, structured: dict | None, seed: int) -> str:
    extra = {"structured_outputs": structured} if structured else {}
    out = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=prompt,
        max_tokens=96,
        temperature=1.0,
        seed=seed,
        extra_body=extra,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop" or structured is None, choice
    return choice.text


def test_json_schema_regex_and_choice_are_always_valid(client):
    regex = r"[a-c]{3}-[0-9]{2}"
    choices = ["yes", "no", "maybe"]
    jobs = [("json", {"json": SCHEMA}, i) for i in range(20)]
    jobs += [("regex", {"regex": regex}, i) for i in range(3)]
    jobs += [("choice", {"choice": choices}, i) for i in range(3)]
    jobs += [("free", None, i) for i in range(2)]  # unconstrained rows in the same batches
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(
            pool.map(lambda j: complete(client, f"Request {j[2]}:", j[1], seed=j[2]), jobs)
        )
    for (kind, _, _), text in zip(jobs, texts, strict=True):
        if kind == "json":
            jsonschema.validate(json.loads(text), SCHEMA)
        elif kind == "regex":
            assert re.fullmatch(regex, text), text
        elif kind == "choice":
            assert text in choices, text
    assert len({t for (kind, _, _), t in zip(jobs, texts, strict=True) if kind == "json"}) > 1


def test_chat_response_format_json_schema(client):
    out = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "Describe a ball as JSON."}],
        max_tokens=96,
        temperature=1.0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "ball", "schema": SCHEMA},
        },
    )
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
