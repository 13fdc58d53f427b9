"""The live server the serving tests share: SmolLM2 under ``vllm serve --device cpu``.

One server per test session (start-up and first-use compiles are the slow part), with an API
key so that every test also runs through vLLM's authentication.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.server import API_KEY, Server, vllm_server

SERVE_ARGS = (
    "--max-model-len",
    "512",
    "--max-num-seqs",
    "8",
    "--kv-cache-memory-bytes",
    str(128 * 2**20),
)


@pytest.fixture(scope="session")
def smollm2_server(smollm2_dir) -> Iterator[Server]:
    with vllm_server(smollm2_dir, *SERVE_ARGS, api_key=API_KEY) as server:
        yield server
