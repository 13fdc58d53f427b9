"""The jitted sampler against vLLM's SamplingParams meaning, on random logits."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tpu_plugin.runner.sampler import SamplingInputs, sample

VOCAB = 64


def inputs(rows: int, *, temperature=1.0, top_k=0, top_p=1.0, seeds=None, draws=None):
    def full(value, dtype):
        return np.broadcast_to(np.asarray(value, dtype), (rows,)).copy()

    return SamplingInputs(
        temperature=full(temperature, np.float32),
        top_k=full(top_k, np.int32),
        top_p=full(top_p, np.float32),
        seeds=full(np.arange(rows) if seeds is None else seeds, np.uint32),
        draws=full(0 if draws is None else draws, np.int32),
    )


@pytest.fixture
def logits() -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(3), (8, VOCAB)) * 3, np.float32)


def run(logits, params, **flags):
    flags = {"all_greedy": False, "use_top_k_top_p": True, "num_logprobs": 0, **flags}
    return sample(logits, params, **flags)


def test_greedy_is_argmax(logits):
    for all_greedy in (True, False):
        out = run(logits, inputs(8, temperature=0.0), all_greedy=all_greedy)
        np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))


def test_top_k_never_samples_outside_the_top_k(logits):
    k = 3
    allowed = np.argsort(-logits, axis=-1)[:, :k]
    for seed in range(40):
        tokens = np.asarray(
            run(logits, inputs(8, top_k=k, seeds=np.arange(8) + 100 * seed)).token_ids
        )
        assert all(tokens[r] in allowed[r] for r in range(8))


def test_top_p_keeps_the_smallest_nucleus(logits):
    top_p = 0.5
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)
    nucleus = []
    for r in range(8):
        mass_before = np.cumsum(probs[r, order[r]]) - probs[r, order[r]]
        nucleus.append(set(order[r][mass_before < top_p].tolist()))
    seen = [set() for _ in range(8)]
    for seed in range(60):
        tokens = np.asarray(
            run(logits, inputs(8, top_p=top_p, seeds=np.arange(8) + 8 * seed)).token_ids
        )
        for r in range(8):
            seen[r].add(int(tokens[r]))
    for r in range(8):
        assert seen[r] <= nucleus[r]
    assert any(len(s) > 1 for s in seen), "sampling should not collapse to greedy"


def test_seeded_rows_do_not_depend_on_their_batch(logits):
    seeds = np.full(8, 1234)
    out = np.asarray(run(logits, inputs(8, seeds=seeds, draws=5)).token_ids)
    alone = np.asarray(run(logits[2:3], inputs(1, seeds=[1234], draws=5)).token_ids)
    assert out[2] == alone[0]
    again = np.asarray(run(logits, inputs(8, seeds=seeds, draws=5)).token_ids)
    np.testing.assert_array_equal(out, again)


def test_logprobs_are_raw_log_softmax_with_vllm_ranks(logits):
    out = run(logits, inputs(8, temperature=0.7), num_logprobs=5)
    expected = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(out.topk_logprobs, -np.sort(-expected, -1)[:, :5], rtol=1e-6)
    tokens = np.asarray(out.token_ids)
    sampled = expected[np.arange(8), tokens]
    np.testing.assert_allclose(out.sampled_logprob, sampled, rtol=1e-6)
    np.testing.assert_array_equal(out.sampled_rank, (expected >= sampled[:, None]).sum(-1))


# ---- logits processors against vLLM's own torch implementations ------------------------------


def _torch(x):
    import torch

    return torch.tensor(np.asarray(x))


def test_penalties_match_vllm_apply_penalties(logits):
    from vllm.model_executor.layers.utils import apply_penalties as vllm_apply_penalties

    from tpu_plugin.runner.logits_processing import apply_penalties

    rng = np.random.default_rng(0)
    rows, width = 8, 24
    num_prompt = rng.integers(1, 12, rows)
    num_tokens = num_prompt + rng.integers(0, 12, rows)
    tokens = rng.integers(0, 16, (rows, width))  # few distinct ids: many repeats
    presence = rng.uniform(-1, 1, rows).astype(np.float32)
    frequency = rng.uniform(-1, 1, rows).astype(np.float32)
    repetition = rng.uniform(0.5, 2, rows).astype(np.float32)
    repetition[0], presence[0], frequency[0] = 1.0, 0.0, 0.0  # an unpenalised row
    ours = jax.jit(apply_penalties)(
        logits, tokens, num_prompt, num_tokens, presence, frequency, repetition
    )
    prompt = np.full((rows, width), VOCAB)
    output = np.full((rows, width), VOCAB)
    for r in range(rows):
        prompt[r, : num_prompt[r]] = tokens[r, : num_prompt[r]]
        n_out = num_tokens[r] - num_prompt[r]
        output[r, :n_out] = tokens[r, num_prompt[r] : num_tokens[r]]
    expected = vllm_apply_penalties(
        _torch(logits).clone(),
        _torch(prompt),
        _torch(output),
        _torch(presence),
        _torch(frequency),
        _torch(repetition),
    ).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ours[0], logits[0])


def test_bad_words_match_vllm(logits):
    from vllm.v1.sample.ops.bad_words import apply_bad_words as vllm_bad_words

    from tpu_plugin.runner.input_batch import bad_word_rows
    from tpu_plugin.runner.logits_processing import apply_bad_words

    words = {0: [[5], [1, 2, 3]], 1: [[7, 9]], 2: [[4, 4, 4, 4]], 3: [[1, 2, 3]]}
    outputs = [[8, 1, 2], [3, 7], [4, 4, 4], [2]]
    width = 4
    table = np.full((4, 2, width), -1, np.int32)
    for r, ws in words.items():
        rows = bad_word_rows(ws)
        table[r, : len(ws), width - rows.shape[1] :] = rows
    history = np.full((4, width - 1), -2, np.int32)
    for r, out in enumerate(outputs):
        tail = out[-(width - 1) :]
        history[r, width - 1 - len(tail) :] = tail
    ours = np.asarray(jax.jit(apply_bad_words)(logits[:4], table, history))
    expected = _torch(logits[:4]).clone()
    vllm_bad_words(expected, words, outputs)
    np.testing.assert_array_equal(ours, expected.numpy())
    assert np.isneginf(ours[0, [5, 3]]).all() and np.isneginf(ours[1, 9])


def test_grammar_bitmask_matches_xgrammar(logits):
    import torch
    import xgrammar as xgr

    from tpu_plugin.runner.logits_processing import apply_bitmask

    rng = np.random.default_rng(1)
    bitmask = rng.integers(-(2**31), 2**31, (8, VOCAB // 32), dtype=np.int64).astype(np.int32)
    bitmask[3] = -1  # a row without a grammar
    expected = torch.tensor(logits).clone()
    xgr.apply_token_bitmask_inplace(expected, torch.tensor(bitmask))
    np.testing.assert_array_equal(apply_bitmask(logits, bitmask), expected.numpy())


def test_min_p_logit_bias_allowed_ids_and_min_tokens(logits):
    from tpu_plugin.runner import logits_processing as lp

    min_p = np.linspace(0, 0.9, 8).astype(np.float32)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    keep = probs >= probs.max(-1, keepdims=True) * min_p[:, None]
    np.testing.assert_array_equal(np.isfinite(lp.apply_min_p(logits, min_p)), keep)

    ids = np.array([[3, 9, VOCAB], [VOCAB, VOCAB, VOCAB]] * 4, np.int32)
    bias = np.array([[100.0, -5.0, 0.0], [0.0, 0.0, 0.0]] * 4, np.float32)
    biased = np.asarray(jax.jit(lp.apply_logit_bias)(logits, ids, bias))
    expected = logits.copy()
    expected[::2, 3] += 100
    expected[::2, 9] -= 5
    np.testing.assert_allclose(biased, expected)

    allowed = np.asarray(jax.jit(lp.apply_allowed_ids)(logits, ids))
    assert np.isfinite(allowed[1::2]).all()
    assert set(np.nonzero(np.isfinite(allowed[0]))[0]) == {3, 9}

    stops = np.array([[1, 2, VOCAB]] * 8, np.int32)
    min_tokens = jax.jit(lp.apply_min_tokens)
    masked = np.asarray(min_tokens(logits, stops, np.zeros(8, bool)))
    assert np.isneginf(masked[:, [1, 2]]).all() and np.isfinite(masked[:, 3:]).all()
    # A structured-output row whose grammar allows only stop tokens keeps them.
    only_stop = np.full_like(logits, -np.inf)
    only_stop[:, 2] = 1.0
    kept = np.asarray(min_tokens(only_stop, stops, np.arange(8) % 2 == 0))
    assert np.isfinite(kept[::2, 2]).all() and np.isneginf(kept[1::2]).all()


# ---- the whole sampler on a mixed batch, host side included -----------------------------------


def _batch_with(params_list, outputs):
    from vllm import SamplingParams  # noqa: F401  (params_list holds SamplingParams)

    from tpu_plugin.runner.input_batch import InputBatch, RequestState

    batch = InputBatch(16, 64, 4, vocab_size=VOCAB)
    rng = np.random.default_rng(5)
    for i, (params, out) in enumerate(zip(params_list, outputs, strict=True)):
        prompt = rng.integers(0, VOCAB, 6).tolist()
        state = RequestState(f"r{i}", prompt, params, [0], len(prompt), list(out))
        batch.add(state)
    return batch


def _vllm_reference(logits, params_list, prompts, outputs):
    """vLLM's processing order with its own ops, one request at a time (argmax-relevant part)."""
    import torch
    from vllm.model_executor.layers.utils import apply_penalties as vllm_apply_penalties
    from vllm.v1.sample.ops.bad_words import apply_bad_words as vllm_bad_words

    out = torch.tensor(logits).clone()
    for r, (p, prompt, output) in enumerate(zip(params_list, prompts, outputs, strict=True)):
        row = out[r : r + 1]
        if p.allowed_token_ids:
            mask = torch.ones(VOCAB, dtype=torch.bool)
            mask[p.allowed_token_ids] = False
            row.masked_fill_(mask, float("-inf"))
        if p.bad_words_token_ids:
            vllm_bad_words(row, {0: p.bad_words_token_ids}, [output])
        if p.min_tokens and len(output) < p.min_tokens:
            row[0, sorted(p.all_stop_token_ids)] = float("-inf")
        for token, bias in (p.logit_bias or {}).items():
            row[0, token] += bias
        vllm_apply_penalties(
            row,
            torch.tensor([prompt]),
            torch.tensor([output or [VOCAB]]),
            torch.tensor([p.presence_penalty]),
            torch.tensor([p.frequency_penalty]),
            torch.tensor([p.repetition_penalty]),
        )
    return out.numpy()


def test_mixed_batch_greedy_matches_vllm_processing(logits):
    from vllm import SamplingParams

    def params(**kw):
        p = SamplingParams(temperature=0.0, **kw)
        p._all_stop_token_ids.update(p.stop_token_ids or [])
        return p

    top = logits.argmax(-1)
    bad = params()
    bad._bad_words_token_ids = [[int(top[2])], [7, 8]]
    params_list = [
        params(),
        params(logit_bias={5: 100.0}),
        bad,
        params(allowed_token_ids=[1, 2, 3]),
        params(min_tokens=4, stop_token_ids=[int(top[4])]),
        params(repetition_penalty=3.0, frequency_penalty=1.0, presence_penalty=2.0),
        params(min_tokens=1, stop_token_ids=[int(top[6])]),  # already reached: no effect
        params(presence_penalty=-0.5),
    ]
    outputs = [[], [1], [7], [], [1, 2], [int(top[5]), int(top[5])], [3], [9, 9, 9]]
    batch = _batch_with(params_list, outputs)
    slots = np.arange(8, dtype=np.int32)
    prompts = [batch.token_ids[s, : batch.num_prompt_tokens[s]].tolist() for s in slots]
    sampling = inputs(8, temperature=0.0)._replace(**batch.processor_inputs(slots, 8))
    out = run(logits, sampling, all_greedy=True, num_logprobs=3)
    expected = _vllm_reference(logits, params_list, prompts, outputs)
    np.testing.assert_array_equal(out.token_ids, expected.argmax(-1))
    assert out.token_ids[1] == 5 and out.token_ids[3] in (1, 2, 3)
    assert out.token_ids[2] != top[2] and out.token_ids[4] != top[4]
    assert out.token_ids[6] == top[6]
    # Raw logprobs ignore every processor.
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(out.topk_logprobs, -np.sort(-raw, -1)[:, :3], rtol=1e-6)


def test_allowed_ids_and_min_p_bound_random_draws(logits):
    from vllm import SamplingParams

    allowed = [4, 17, 33, 60]
    params_list = [SamplingParams(allowed_token_ids=allowed), SamplingParams(min_p=0.3)] * 4
    batch = _batch_with(params_list, [[]] * 8)
    extra = batch.processor_inputs(np.arange(8, dtype=np.int32), 8)
    scaled = logits / 1.5  # min-p applies after temperature, as in vLLM
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    above_min_p = probs >= 0.3 * probs.max(-1, keepdims=True)
    seen = set()
    for seed in range(40):
        sampling = inputs(8, temperature=1.5, seeds=np.arange(8) + 8 * seed)._replace(**extra)
        tokens = np.asarray(run(logits, sampling, use_top_k_top_p=False).token_ids)
        for r in range(0, 8, 2):
            assert tokens[r] in allowed
            seen.add(int(tokens[r]))
        for r in range(1, 8, 2):
            assert above_min_p[r, tokens[r]]
    assert len(seen) > 1


def test_logprobs_modes(logits):
    base = inputs(8, temperature=0.5, top_k=4)
    raw = run(logits, base, num_logprobs=2, logprobs_mode="raw_logits")
    np.testing.assert_allclose(raw.topk_logprobs, -np.sort(-logits, -1)[:, :2])
    processed = run(logits, base, num_logprobs=5, logprobs_mode="processed_logprobs")
    # Temperature 0.5 and top-4: four finite scores that are a distribution of logits / 0.5.
    top4 = -np.sort(-logits, -1)[:, :4] / 0.5
    expected = top4 - np.log(np.exp(top4 - top4.max(-1, keepdims=True)).sum(-1, keepdims=True))
    expected -= top4.max(-1, keepdims=True)
    np.testing.assert_allclose(processed.topk_logprobs[:, :4], expected, rtol=1e-5, atol=1e-5)
    assert np.isneginf(processed.topk_logprobs[:, 4]).all()


def test_prompt_logprobs_are_log_softmax_of_the_extra_rows(logits):
    from tpu_plugin.runner.sampler import prompt_logprobs

    targets = np.array([3, 1, 4, 1, 5], np.int32)
    ids, scores, ranks = prompt_logprobs(
        logits, targets, start=3, num_logprobs=4, logprobs_mode="raw_logprobs"
    )
    expected = np.asarray(jax.nn.log_softmax(logits[3:], axis=-1))
    np.testing.assert_array_equal(np.asarray(ids)[:, 0], targets)
    np.testing.assert_allclose(scores[:, 0], expected[np.arange(5), targets], rtol=1e-6)
    np.testing.assert_allclose(scores[:, 1:], -np.sort(-expected, -1)[:, :4], rtol=1e-6)
    np.testing.assert_array_equal(
        ranks, (expected >= expected[np.arange(5), targets][:, None]).sum(-1)
    )


def test_logprob_token_ids_replace_the_top_k_in_their_rows(logits):
    chosen = np.full((8, 3), -1, np.int32)
    chosen[:4, :2] = [[3, 7], [0, 63], [5, 5], [10, 11]]
    out = run(logits, inputs(8, temperature=0.0)._replace(logprob_ids=chosen), num_logprobs=2)
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    ids, values = np.asarray(out.topk_ids), np.asarray(out.topk_logprobs)
    assert ids.shape == (8, 3)
    np.testing.assert_array_equal(ids[:4, :2], chosen[:4, :2])
    np.testing.assert_allclose(values[:4, :2], np.take_along_axis(raw[:4], chosen[:4, :2], 1))
    assert np.isneginf(values[:4, 2]).all()
    np.testing.assert_allclose(values[4:, :2], -np.sort(-raw[4:], -1)[:, :2], rtol=1e-6)
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))


def test_platform_accepts_every_v1_sampling_field():
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from tpu_plugin.platform import unsupported_sampling_fields

    everything = SamplingParams(
        n=2,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        min_p=0.1,
        seed=1,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.2,
        logit_bias={1: 2.0},
        allowed_token_ids=[1, 2],
        bad_words=["x"],
        min_tokens=2,
        logprobs=3,
        prompt_logprobs=2,
        logprob_token_ids=[4],
        structured_outputs=StructuredOutputsParams(choice=["a", "b"]),
    )
    assert unsupported_sampling_fields(everything) == []
    assert unsupported_sampling_fields(SamplingParams(prompt_logprob_start=3)) == [
        "prompt_logprob_start"
    ]


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        (0.0, 0, 1.0),  # every row greedy: the program skips the draw
        (np.array([0.0, 0.7] * 4), 0, 1.0),  # mixed rows, no top-k/top-p: no sort
        (np.array([0.0, 0.7] * 4), np.array([0, 3] * 4), 0.9),  # mixed, masks on
    ],
)
@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logprobs"])
def test_flags_decided_at_run_time_equal_the_static_program(
    logits, temperature, top_k, top_p, mode
):
    """``None`` flags (the CPU's single program) sample exactly what the static program the
    runner would pick for the same rows samples, logprobs included."""
    params = inputs(8, temperature=temperature, top_k=top_k, top_p=top_p, seeds=np.arange(8) + 7)
    static = {
        "all_greedy": bool(np.all(np.asarray(temperature) == 0)),
        "use_top_k_top_p": bool(np.any(np.asarray(top_k) > 0) or np.any(np.asarray(top_p) < 1)),
    }
    want = run(logits, params, num_logprobs=4, logprobs_mode=mode, **static)
    got = run(
        logits,
        params,
        num_logprobs=4,
        logprobs_mode=mode,
        all_greedy=None,
        use_top_k_top_p=None,
    )
    for name, value in want._asdict().items():
        value, other = np.asarray(value), np.asarray(getattr(got, name))
        if value.dtype.kind == "f":  # another fusion of the same ops: float rounding only
            np.testing.assert_allclose(other, value, rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(other, value, name)


@pytest.mark.parametrize("wanted", [[False] * 8, [True] + [False] * 7])
def test_logprobs_decided_at_run_time(logits, wanted):
    """``want_logprobs`` rows: logprobs as the static program computes them when any row asks,
    zeros (and the same tokens) when none does."""
    params = inputs(8, temperature=np.array([0.0, 0.9] * 4), seeds=np.arange(8))
    static = run(logits, params, num_logprobs=5, all_greedy=False, use_top_k_top_p=False)
    got = run(
        logits,
        params._replace(want_logprobs=np.asarray(wanted)),
        num_logprobs=5,
        all_greedy=None,
        use_top_k_top_p=None,
    )
    np.testing.assert_array_equal(np.asarray(got.token_ids), np.asarray(static.token_ids))
    if any(wanted):
        np.testing.assert_allclose(
            np.asarray(got.topk_logprobs), np.asarray(static.topk_logprobs), rtol=1e-5
        )
        np.testing.assert_array_equal(np.asarray(got.topk_ids), np.asarray(static.topk_ids))
    else:
        assert not np.any(np.asarray(got.topk_logprobs)) and not np.any(np.asarray(got.topk_ids))
