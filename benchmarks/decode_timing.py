"""Decode tok/s through ``vllm.LLM`` with no compile inside the timed runs (one helper for
``gpu_suite.py``, ``bench_quantized.py`` and ``bench_lora.py``)."""

from __future__ import annotations

import time

TIMED_ATTEMPTS = 4


def time_decode(llm, inputs: list, new_tokens: int, **generate: object) -> dict:
    """Decode tok/s of ``inputs`` (greedy, ``new_tokens`` each, ignore_eos) through ``llm``.

    A warm-up (a full run and a prefill-only run, ``max_tokens=1``), then the timed runs: the
    best of two prefill-only runs and a full run, decode = full - prefill, repeated (at most
    ``TIMED_ATTEMPTS``) until an attempt compiled nothing in the worker
    (``worker_compile_count``). With ``TPU_PLUGIN_PRECOMPILE=0`` each new step shape compiles
    on first use, and vLLM's asynchronous scheduling mixes chunks and decode rows differently
    from run to run, so a single warm-up left compiles inside the timed runs (2026-12-02: a
    0-adapter LoRA case 1.5x "faster" than the same program in the base engine, a GPU prefill
    run longer than the full run). ``compiles_in_timed_runs`` (of the last attempt) must be 0
    for the figure to count. ``generate``: more ``llm.generate`` arguments (``lora_request``).
    """
    from vllm import SamplingParams

    from tpu_plugin.runner.compile import worker_compile_count

    full = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    kwargs = dict(use_tqdm=False, **generate)

    def compiles() -> int:
        return llm.collective_rpc(worker_compile_count)[0]

    t0 = time.perf_counter()
    llm.generate(inputs, full, **kwargs)
    llm.generate(inputs, first, **kwargs)
    warmup = time.perf_counter() - t0
    attempts = 0
    while attempts < TIMED_ATTEMPTS:
        attempts += 1
        before = compiles()
        prefill = []
        for _ in range(2):
            start = time.perf_counter()
            llm.generate(inputs, first, **kwargs)
            prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        outs = llm.generate(inputs, full, **kwargs)
        full_s = time.perf_counter() - start
        compiled = compiles() - before
        if not compiled:
            break
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return {
        "warmup_s": warmup,
        "timed_attempts": attempts,
        "compiles_in_timed_runs": compiled,
        "prefill_s": min(prefill),
        "full_s": full_s,
        "decode_tok_s": len(inputs) * (new_tokens - 1) / (full_s - min(prefill)),
        "outputs": outs,
    }
