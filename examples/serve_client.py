"""Talks to ``vllm serve <model> --device cpu`` with the official ``openai`` client.

    vllm serve ~/.cache/tpu-plugin/models/SmolLM2-135M-Instruct --device cpu --max-model-len 2048 &
    python examples/serve_client.py [--base-url http://127.0.0.1:8000/v1]

Sends a completion, a chat completion and a streamed chat completion, printing each answer.
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id

    completion = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=16, temperature=0
    )
    print("completion:", repr(completion.choices[0].text))

    messages = [{"role": "user", "content": "Name one planet of the solar system."}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=32, temperature=0
    )
    print("chat:", repr(chat.choices[0].message.content))

    print("stream: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=32, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
