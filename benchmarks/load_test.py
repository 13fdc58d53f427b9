"""Load test for ``vllm serve --device cpu``: concurrent streams, mid-stream disconnects, leaks.

Sends ``--requests`` streaming completions at once (token-id prompts of mixed lengths,
``ignore_eos`` so every finished request must return exactly ``max_tokens`` tokens). A fraction
``--abort-fraction`` of them closes the HTTP connection after a few tokens, which makes vLLM
abort the request. ``--extra-aborts`` then adds waves of requests that all disconnect, so the
abort path runs many times. Afterwards it sends one short request (its last engine step
publishes fresh scheduler stats) and reads ``/metrics``: KV cache usage must be back to 0
(vLLM counts cached-but-unreferenced prefix blocks as free) and no request may be left
running or waiting.

Bounded: a fixed request count, a per-request timeout, a wall-clock limit, loopback only.

    python benchmarks/load_test.py            # reduced: 32 requests, 10% aborts
    python benchmarks/load_test.py --full     # 256 concurrent, 10% aborts, then 1,000 aborts
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --api-key K   # running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.e2e.server import API_KEY, Server, vllm_server  # noqa: E402


@dataclass
class Outcome:
    """One request: tokens received, whether it was meant to disconnect, latency, error."""

    expected_tokens: int
    abort_after: int | None
    tokens: int = 0
    usage_tokens: int | None = None
    latency_s: float = 0.0
    error: str | None = None

    @property
    def aborted(self) -> bool:
        return self.abort_after is not None

    @property
    def correct(self) -> bool:
        """A finished request returned exactly its ``max_tokens`` (streamed and in usage)."""
        return (
            self.error is None
            and self.tokens == self.expected_tokens
            and self.usage_tokens == self.expected_tokens
        )


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    kv_usage_after: float = float("nan")
    running_after: float = float("nan")
    waiting_after: float = float("nan")
    preemptions: float = float("nan")
    num_blocks: float = float("nan")

    @property
    def completed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.aborted]

    @property
    def aborts(self) -> int:
        return sum(o.aborted for o in self.outcomes)

    @property
    def wrong(self) -> list[Outcome]:
        return [o for o in self.completed if not o.correct]

    def latency_ms(self, q: float) -> float:
        lat = sorted(o.latency_s for o in self.completed)
        if not lat:
            return float("nan")
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))]

    @property
    def leaked_blocks(self) -> float:
        """Blocks still in use with nothing running (usage excludes vLLM's null block)."""
        return round(self.kv_usage_after * (self.num_blocks - 1), 3)

    def leaked(self) -> bool:
        return not (self.leaked_blocks == 0 and self.running_after == self.waiting_after == 0)

    def summary(self) -> dict:
        return {
            "requests": len(self.outcomes),
            "completed": len(self.completed),
            "completed_correct": len(self.completed) - len(self.wrong),
            "aborts": self.aborts,
            "p50_ms": round(self.latency_ms(0.50), 1),
            "p99_ms": round(self.latency_ms(0.99), 1),
            "mean_ms": round(1000 * statistics.fmean(o.latency_s for o in self.completed), 1)
            if self.completed
            else None,
            "wall_s": round(self.wall_s, 1),
            "kv_cache_usage_after": self.kv_usage_after,
            "kv_blocks": self.num_blocks,
            "leaked_blocks": self.leaked_blocks,
            "running_after": self.running_after,
            "waiting_after": self.waiting_after,
            "preemptions": self.preemptions,
            "leaked": self.leaked(),
        }


async def stream_one(
    client: httpx.AsyncClient, server: Server, model: str, prompt: list[int], out: Outcome
) -> None:
    """Streams one completion; disconnects after ``out.abort_after`` tokens when set."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": out.expected_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    try:
        async with client.stream(
            "POST", server.v1 + "/completions", json=body, headers=server.headers()
        ) as response:
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    out.tokens += len(choice.get("token_ids") or [])
                if chunk.get("usage"):
                    out.usage_tokens = chunk["usage"]["completion_tokens"]
                if out.abort_after is not None and out.tokens >= out.abort_after:
                    break  # leaving the block closes the connection: vLLM aborts the request
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        out.error = f"{type(error).__name__}: {error}"
    finally:
        out.latency_s = time.perf_counter() - start


async def wave(
    server: Server,
    model: str,
    count: int,
    abort_fraction: float,
    max_tokens: tuple[int, int],
    prompt_len: tuple[int, int],
    vocab: int,
    rng: random.Random,
    timeout_s: float,
) -> list[Outcome]:
    """``count`` concurrent streams; ``round(count * abort_fraction)`` of them disconnect."""
    n_abort = round(count * abort_fraction)
    aborting = set(rng.sample(range(count), n_abort))
    outcomes, prompts = [], []
    for i in range(count):
        n_out = rng.randint(*max_tokens)
        abort_after = rng.randint(1, max(1, n_out // 2)) if i in aborting else None
        outcomes.append(Outcome(expected_tokens=n_out, abort_after=abort_after))
        prompts.append([rng.randrange(100, vocab) for _ in range(rng.randint(*prompt_len))])
    limits = httpx.Limits(max_connections=count + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(
            *(
                stream_one(client, server, model, p, o)
                for p, o in zip(prompts, outcomes, strict=True)
            )
        )
    return outcomes


def model_id(server: Server) -> str:
    response = httpx.get(server.v1 + "/models", headers=server.headers(), timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def run_load(
    server: Server,
    requests: int = 32,
    abort_fraction: float = 0.1,
    extra_aborts: int = 0,
    max_tokens: tuple[int, int] = (4, 24),
    prompt_len: tuple[int, int] = (4, 96),
    vocab: int = 49152,
    seed: int = 0,
    time_limit_s: float = 1800,
    request_timeout_s: float = 600,
) -> Report:
    """The whole load test against a running server; see the module docstring."""
    rng = random.Random(seed)
    model = model_id(server)
    report = Report()
    start = time.perf_counter()
    args = (max_tokens, prompt_len, vocab, rng, request_timeout_s)
    report.outcomes += asyncio.run(wave(server, model, requests, abort_fraction, *args))
    while report.aborts < extra_aborts + round(requests * abort_fraction):
        if time.perf_counter() - start > time_limit_s:
            raise TimeoutError(f"load test passed its {time_limit_s:.0f} s limit")
        count = min(requests, extra_aborts + round(requests * abort_fraction) - report.aborts)
        report.outcomes += asyncio.run(wave(server, model, count, 1.0, *args))
    report.wall_s = time.perf_counter() - start
    # One finished request after the storm: its last step publishes the scheduler's stats.
    probe = Outcome(expected_tokens=2, abort_after=None)
    asyncio.run(_probe(server, model, probe))
    if not probe.correct:
        raise RuntimeError(f"the server did not serve a request after the load: {probe}")
    metrics = server.metrics()
    report.kv_usage_after = metrics.get("vllm:kv_cache_usage_perc", float("nan"))
    report.running_after = metrics.get("vllm:num_requests_running", float("nan"))
    report.waiting_after = metrics.get("vllm:num_requests_waiting", float("nan"))
    report.preemptions = metrics.get("vllm:num_preemptions_total", float("nan"))
    report.num_blocks = metrics.get("num_gpu_blocks", float("nan"))
    return report


async def _probe(server: Server, model: str, out: Outcome) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        await stream_one(client, server, model, [100, 200, 300], out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="256 concurrent + 1,000 aborts")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--abort-fraction", type=float, default=0.1)
    parser.add_argument("--extra-aborts", type=int, default=0)
    parser.add_argument("--url", help="a running server (default: start SmolLM2 on loopback)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=1800)
    args = parser.parse_args()
    if args.full:
        args.requests, args.extra_aborts = 256, 1000 - round(256 * args.abort_fraction)

    def run(server: Server) -> Report:
        report = run_load(
            server,
            requests=args.requests,
            abort_fraction=args.abort_fraction,
            extra_aborts=args.extra_aborts,
            time_limit_s=args.time_limit,
        )
        print(json.dumps(report.summary(), indent=1))
        for bad in report.wrong[:5]:
            print("wrong:", bad)
        return report

    if args.url:
        report = run(Server(args.url, args.api_key, log=None, process=None))  # type: ignore[arg-type]
    else:
        from tpu_plugin.tools.build_smollm2 import build

        with vllm_server(
            build(),
            "--max-model-len",
            "512",
            "--max-num-seqs",
            str(args.max_num_seqs),
            "--kv-cache-memory-bytes",
            str(512 * 2**20),
            api_key=API_KEY,
            startup_timeout=1800,  # precompiling every bucket on a cold cache takes minutes
        ) as server:
            report = run(server)
            if server.process.poll() is not None:
                raise SystemExit("the server died during the load test")
    sys.exit(1 if report.wrong or report.leaked() else 0)


if __name__ == "__main__":
    main()
