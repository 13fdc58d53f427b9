"""Draft verification (``spec_decode.verify_drafts``) against vLLM's rejection-sampling rules.

vLLM's ``RejectionSampler`` runs Triton kernels, which need a GPU, so the oracle here is the
rule those kernels implement, written as the per-request loop they run
(``vllm/v1/sample/rejection_sampler.py``, no draft probabilities as for n-gram drafts):

* greedy: walk the drafts; emit the target argmax at each position; stop after the first
  position where the draft differs from it; if none differs, emit the bonus token;
* random: draft ``d`` is accepted when ``p(d) >= u``; the first rejected position emits a token
  drawn from ``p`` without ``d``; if none is rejected, emit the bonus token.

The random rule is checked by its guarantee (the emitted token is distributed as ``p``,
whatever the draft), by its acceptance frequency (``p(d)``) and by its edge cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpu_plugin.runner.spec_decode import SpecPlan, pack_drafts, verify_drafts

VOCAB = 32


def greedy_oracle(logits, drafts, num_drafts, bonus):
    """vLLM's greedy kernel as a loop: [rows, K + 1] with -1 after the emitted tokens."""
    rows, k = drafts.shape
    out = np.full((rows, k + 1), -1, np.int64)
    for i in range(rows):
        rejected = False
        for pos in range(num_drafts[i]):
            target = int(np.argmax(logits[i, pos]))
            out[i, pos] = target
            if drafts[i, pos] != target:
                rejected = True
                break
        if not rejected:
            out[i, num_drafts[i]] = bonus[i]
    return out


def run(logits, drafts, num_drafts, bonus, temperature, top_k=None, top_p=None, seeds=None):
    """``logits`` ``[rows, K, V]`` per draft slot; packed as the runner packs them."""
    rows, k = drafts.shape
    num_drafts = np.asarray(num_drafts, np.int32)
    top_k = np.zeros(rows, np.int32) if top_k is None else top_k
    top_p = np.ones(rows, np.float32) if top_p is None else top_p
    seeds = np.arange(rows, dtype=np.uint32) if seeds is None else seeds
    packed = pack_drafts(num_drafts, k)
    packed_logits = logits[packed.row_req, packed.row_pos]  # padding rows: any row
    out = verify_drafts(
        jnp.asarray(packed_logits),
        jnp.asarray(drafts, jnp.int32),
        jnp.asarray(num_drafts),
        jax.device_put(packed),
        jnp.asarray(bonus, jnp.int32),
        jnp.asarray(temperature, jnp.float32),
        jnp.asarray(top_k, jnp.int32),
        jnp.asarray(top_p, jnp.float32),
        jnp.asarray(seeds, jnp.uint32),
        jnp.zeros(rows, jnp.int32),
        all_greedy=bool(np.all(temperature == 0)),
        use_top_k_top_p=bool(np.any(top_k > 0) or np.any(top_p < 1)),
    )
    return np.asarray(out)


def test_pack_drafts():
    packed = pack_drafts(np.array([2, 0, 3, 0], np.int32), 3)
    np.testing.assert_array_equal(packed.row_req, [0, 0, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(packed.row_pos, [0, 1, 0, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(packed.gather, [[0, 1, 8], [8, 8, 8], [2, 3, 4], [8, 8, 8]])


def greedy_case(rows=16, k=4, seed=0):
    """Drafts equal to the argmax for a random prefix of each row, then a wrong token."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, k, VOCAB)).astype(np.float32)
    argmax = logits.argmax(-1)
    num_drafts = rng.integers(0, k + 1, rows)
    matches = rng.integers(0, k + 1, rows)
    drafts = np.where(np.arange(k) < matches[:, None], argmax, (argmax + 1) % VOCAB)
    drafts = np.where(np.arange(k) < num_drafts[:, None], drafts, -1).astype(np.int32)
    bonus = rng.integers(0, VOCAB, rows)
    return logits, drafts, num_drafts, bonus


@pytest.mark.parametrize("all_greedy", [True, False])
def test_greedy_rows_follow_vllm_rule(all_greedy):
    logits, drafts, num_drafts, bonus = greedy_case()
    temperature = np.zeros(len(bonus), np.float32)
    if not all_greedy:  # the greedy rows of a batch that also samples
        temperature[::2] = 0.8
    got = run(logits, drafts, num_drafts, bonus, temperature)
    want = greedy_oracle(logits, drafts, num_drafts, bonus)
    greedy_rows = temperature == 0
    np.testing.assert_array_equal(got[greedy_rows], want[greedy_rows])
    # Every outcome occurs: all accepted (bonus), rejected at the start and mid-way, none.
    accepted = (got >= 0).sum(1) - 1
    assert set(accepted[greedy_rows]) >= {0, 1} and np.any(accepted == num_drafts)


def test_random_rule_edge_cases():
    """A certain draft is accepted, an impossible one (outside top-k) never is."""
    rows, k = 64, 2
    logits = np.zeros((rows, k, VOCAB), np.float32)
    logits[:, 0, 7] = 100.0  # p(7) = 1 at position 0
    logits[:, 1, :] = np.linspace(0, 3, VOCAB)  # position 1: top-4 are the last 4 ids
    drafts = np.tile(np.array([[7, 0]], np.int32), (rows, 1))  # 0 is outside the top-4
    bonus = np.full(rows, 5)
    top_k = np.full(rows, 4, np.int32)
    got = run(logits, drafts, np.full(rows, k), bonus, np.ones(rows, np.float32), top_k=top_k)
    assert np.all(got[:, 0] == 7), "a draft of probability 1 was rejected"
    assert np.all(got[:, 1] >= VOCAB - 4), "the token after a rejection left the top-k"
    assert np.all(got[:, 2] == -1), "a token followed the rejected position"
    # A row whose drafts are all -1 padding or absent emits its bonus / target token only.
    got = run(logits, np.full((rows, k), -1, np.int32), np.zeros(rows), bonus, np.ones(rows))
    np.testing.assert_array_equal(got[:, 0], bonus)
    assert np.all(got[:, 1:] == -1)


def test_random_rule_emits_the_target_distribution():
    """Whatever the draft, the first emitted token is distributed as p (and p(d) accepts d)."""
    rows, k = 8192, 1
    rng = np.random.default_rng(3)
    row_logits = rng.normal(size=VOCAB).astype(np.float32) * 1.5
    temperature = 0.7
    p = np.exp(row_logits / temperature - np.max(row_logits / temperature))
    p /= p.sum()
    draft = int(np.argsort(p)[-2])  # a likely but not the likeliest token
    logits = np.broadcast_to(row_logits, (rows, k, VOCAB)).copy()
    got = run(
        logits,
        np.full((rows, k), draft, np.int32),
        np.ones(rows),
        np.full(rows, -5),  # the bonus must not matter for the first token
        np.full(rows, temperature, np.float32),
        seeds=np.arange(rows, dtype=np.uint32),
    )
    first = got[:, 0]
    assert np.all(first >= 0)
    accept_rate = np.mean(first == draft)
    assert abs(accept_rate - p[draft]) < 4 * np.sqrt(p[draft] * (1 - p[draft]) / rows)
    counts = np.bincount(first, minlength=VOCAB)
    expected = p * rows
    big = expected > 20
    chi2 = np.sum((counts[big] - expected[big]) ** 2 / expected[big])
    assert chi2 < 3 * big.sum(), f"emitted tokens are not distributed as p (chi2 {chi2:.1f})"
    # An accepted draft is followed by the bonus token; a rejected one by nothing.
    np.testing.assert_array_equal(got[first == draft, 1], -5)
    assert np.all(got[first != draft, 1] == -1)


def test_seeded_rows_repeat():
    logits, drafts, num_drafts, bonus = greedy_case(rows=8, seed=5)
    temperature = np.full(8, 1.5, np.float32)
    seeds = np.full(8, 11, np.uint32)
    a = run(logits, drafts, num_drafts, bonus, temperature, seeds=seeds)
    b = run(logits, drafts, num_drafts, bonus, temperature, seeds=seeds)
    np.testing.assert_array_equal(a, b)


def test_grammar_rows_pick_the_sampling_position():
    """vLLM's bitmask has 1 + scheduled drafts rows per structured request."""
    plan = SpecPlan(
        drafts=np.zeros((4, 3), np.int32),
        num_drafts=np.zeros(4, np.int32),
        packed=pack_drafts(np.zeros(4, np.int32), 3),
        num_rows=0,
        blocks={"a": (3, 0), "b": (0, 0), "c": (3, 2)},
    )
    np.testing.assert_array_equal(plan.grammar_rows(["a", "b", "c"]), [0, 4, 7])
    np.testing.assert_array_equal(plan.grammar_rows(["c"]), [2])


def test_verify_is_one_program_per_shape():
    """Different drafts, acceptances and temperatures reuse the program of their shapes."""
    jax.clear_caches()
    for seed in range(3):
        logits, drafts, _, bonus = greedy_case(rows=8, k=3, seed=seed)
        num_drafts = np.array([3, 0, 1, 2, 0, 0, 3, 1])  # 10 drafts: 16 packed rows
        drafts = np.where(np.arange(3) < num_drafts[:, None], drafts, -1)
        temperature = np.full(8, 0.5 + seed, np.float32)
        run(logits, drafts, num_drafts, bonus, temperature)
    assert verify_drafts._cache_size() == 1
