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
