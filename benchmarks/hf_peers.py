"""The Hugging Face transformers peers of ``gpu_suite.py``, timed the same way as the plugin.

- ``hf``: ``model.generate`` as it comes (eager PyTorch, dynamic KV cache);
- ``hf_compiled``: ``generate`` with a static KV cache, whose decoding steps transformers
  compiles with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs). One
  :class:`transformers.StaticCache` of ``prompt + new tokens`` is made per batch size and reset
  before every call, and the compile is ``dynamic=False, fullgraph=True``: every call of a batch
  size then has the same shapes, so the warm-up call records the graphs the timed call replays
  (a cache re-made per call with a new length, as ``cache_implementation="static"`` does for
  each ``max_new_tokens``, changes shapes, recompiles and may fall back to dynamic shapes).

Whether PyTorch skipped its CUDA graphs, and why, is recorded per batch size
(``cudagraph_skips``: inductor's own count and its "skipping cudagraphs due to ..." messages,
which it logs as performance hints): a peer whose graphs were skipped ran the compiled kernels
one launch at a time.

Decode tokens/s = ``batch * (new_tokens - 1) / (full run - prefill-only run)``, as for the plugin.

``device`` is ``"cuda"`` on the lent GPU; ``"cpu"`` is the suite's ``--cpu-dry-run`` (tiny
shapes: the same calls, the compile included, without CUDA graphs, whose skip is then recorded).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any


class _CudagraphLog(logging.Handler):
    """Keeps the messages PyTorch logs about CUDA graphs (skips and re-recordings)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "cudagraph" in message.lower() or "cuda graph" in message.lower():
            self.messages.append(message[:400])


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(run: Callable[[int], None], n: int) -> float:
    _sync()
    start = time.perf_counter()
    run(n)
    _sync()
    return time.perf_counter() - start


def _load(path: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    model.generation_config.eos_token_id = None
    return model


def bench_hf(
    path: str,
    batches: list[int],
    prompt_ids: Callable[[int], list],
    new_tokens: int,
    results: dict,
    save: Callable[[], None] = lambda: None,
    device: str = "cuda",
) -> None:
    """``model.generate`` eager: ``results["hf@<batch>"]`` (``save`` after each batch)."""
    import torch

    model = _load(path, device)
    for batch in batches:
        ids = torch.tensor(prompt_ids(batch), device=device)

        def run(n: int, ids: torch.Tensor = ids) -> None:
            with torch.no_grad():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )

        _timed(run, 2)
        prefill_s, full_s = _timed(run, 1), _timed(run, new_tokens)
        results[f"hf@{batch}"] = {
            "prefill_s": prefill_s,
            "full_s": full_s,
            "decode_tok_s": batch * (new_tokens - 1) / (full_s - prefill_s),
        }
        print("hf", batch, results[f"hf@{batch}"], flush=True)
        save()


def bench_hf_compiled(
    path: str,
    batches: list[int],
    prompt_ids: Callable[[int], list],
    prompt_len: int,
    new_tokens: int,
    results: dict,
    save: Callable[[], None] = lambda: None,
    timed_tokens: int | None = None,
    device: str = "cuda",
) -> None:
    """Static cache + compiled decoding (module doc): ``results["hf_compiled@<batch>"]``.

    The cache holds ``prompt_len + new_tokens`` positions whatever is generated; ``timed_tokens``
    (default ``new_tokens``) are generated in the timed runs: every decoding step of a static
    cache runs the same shapes, so its time does not depend on how many follow."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import CompileConfig, StaticCache

    model = _load(path, device)
    log = _CudagraphLog()
    torch_logger = logging.getLogger("torch")
    # set_logs first: it resets the handlers of torch's loggers
    torch._logging.set_logs(perf_hints=True, cudagraphs=True)
    torch_logger.addHandler(log)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")
    # transformers compiles only on accelerators unless told otherwise (the CPU dry run)
    if device != "cuda":
        compile_config._compile_all_devices = True
    try:
        for batch in batches:
            ids = torch.tensor(prompt_ids(batch), device=device)
            cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens)
            seen, skips_before = len(log.messages), counters["inductor"]["cudagraph_skips"]

            def run(n: int, ids: torch.Tensor = ids, cache: Any = cache) -> None:
                cache.reset()
                with torch.no_grad():
                    model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        past_key_values=cache,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        pad_token_id=0,
                        compile_config=compile_config,
                    )

            timed = timed_tokens or new_tokens
            start = time.perf_counter()
            _timed(run, 8)  # compiles the decoding step, then records its graphs
            _timed(run, 8)  # replays them (the first replays may still record)
            warmup_s = time.perf_counter() - start
            prefill_s = min(_timed(run, 1), _timed(run, 1))
            full_s = _timed(run, timed)
            results[f"hf_compiled@{batch}"] = {
                "warmup_s": warmup_s,
                "prefill_s": prefill_s,
                "full_s": full_s,
                "decode_tok_s": batch * (timed - 1) / (full_s - prefill_s),
                "timed_tokens": timed,
                "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips_before,
                "cudagraph_messages": log.messages[seen:][:20],
            }
            print("hf_compiled", batch, results[f"hf_compiled@{batch}"], flush=True)
            save()
    finally:
        torch_logger.removeHandler(log)
        torch._logging.set_logs()
