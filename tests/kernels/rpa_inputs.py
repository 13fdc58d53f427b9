"""Random ragged batches for the ragged paged attention tests, and a naive NumPy oracle.

Every batch is padded the way the model runner pads it, and the padding is made hostile:
padding tokens hold random queries, padding sequence slots hold in-range garbage in ``kv_lens``,
``page_indices`` and ``query_start_loc``, page-table entries past a sequence's last page point at
random pages, and every cache slot that holds no real key is NaN. A correct implementation never
lets any of it reach a real output row.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax.numpy as jnp
import numpy as np

from tpu_kernels.ragged_paged_attention import reference

# Batch mixes shared by the reference and kernel tests: [(query_len, kv_len), ...] per name.
MIXES = {
    "decode_only": [(1, 1), (1, 17), (1, 16), (1, 33), (1, 64), (1, 5)],
    "prefill_only": [(23, 23), (16, 16), (40, 40)],
    "chunked_prefill": [(20, 70), (9, 9), (16, 48)],
    "mixed": [(1, 30), (7, 7), (1, 16), (25, 57), (1, 1), (12, 40), (1, 100)],
    "page_boundaries": [(3, 16), (2, 17), (18, 32), (1, 31), (16, 33)],
    "partial_last_page": [(5, 21), (1, 47), (30, 30)],
}


def seed_of(*parts: object) -> int:
    """A fresh, reproducible seed per test case (from its parameters)."""
    return zlib.crc32(repr(parts).encode())


@dataclasses.dataclass
class Batch:
    queries: np.ndarray
    k_pages: np.ndarray
    v_pages: np.ndarray
    kv_lens: np.ndarray
    page_indices: np.ndarray
    query_start_loc: np.ndarray
    num_seqs: np.ndarray
    dtype: object

    def args(self) -> tuple:
        """The seven positional arguments of ``ragged_paged_attention``, as device arrays."""
        return (
            jnp.asarray(self.queries, self.dtype),
            jnp.asarray(self.k_pages, self.dtype),
            jnp.asarray(self.v_pages, self.dtype),
            jnp.asarray(self.kv_lens),
            jnp.asarray(self.page_indices),
            jnp.asarray(self.query_start_loc),
            jnp.asarray(self.num_seqs),
        )

    @property
    def num_real_tokens(self) -> int:
        return int(self.query_start_loc[int(self.num_seqs[0])])


def make_batch(
    seed: int,
    seqs: list[tuple[int, int]],
    *,
    num_q_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 128,
    page_size: int = 16,
    dtype: object = jnp.float32,
    max_num_seqs: int | None = None,
    num_tokens: int | None = None,
    pages_per_seq: int | None = None,
    poison: bool = True,
) -> Batch:
    """A batch of sequences given as ``(query_len, kv_len)``, with padding after them.

    ``kv_len`` includes the step's queries (so ``query_len <= kv_len``); a decode is
    ``(1, kv_len)``, a whole prefill ``(n, n)``, a chunk ``(n, m > n)``.
    """
    rng = np.random.default_rng(seed)
    num_real = len(seqs)
    max_num_seqs = max_num_seqs or num_real + 2
    q_lens = np.array([q for q, _ in seqs], np.int32)
    kv_lens_real = np.array([kv for _, kv in seqs], np.int32)
    assert np.all(q_lens <= kv_lens_real) and num_real <= max_num_seqs
    real_tokens = int(q_lens.sum())
    num_tokens = num_tokens or real_tokens + 3
    assert num_tokens >= real_tokens
    pages_needed = -(-kv_lens_real // page_size)
    pages_per_seq = pages_per_seq or int(pages_needed.max(initial=0)) + 1
    num_pages = int(pages_needed.sum()) + 4  # spare pages nobody owns
    owner = rng.permutation(num_pages)

    page_indices = rng.integers(0, num_pages, (max_num_seqs, pages_per_seq)).astype(np.int32)
    holds_key = np.zeros((num_pages, page_size), bool)
    used = 0
    for s, n in enumerate(pages_needed):
        page_indices[s, :n] = owner[used : used + n]
        used += n
        for k in range(kv_lens_real[s]):
            holds_key[page_indices[s, k // page_size], k % page_size] = True

    kv_lens = rng.integers(0, pages_per_seq * page_size + 1, max_num_seqs).astype(np.int32)
    kv_lens[:num_real] = kv_lens_real
    query_start_loc = rng.integers(0, num_tokens + 1, max_num_seqs + 1).astype(np.int32)
    query_start_loc[0] = 0
    query_start_loc[1 : num_real + 1] = np.cumsum(q_lens)

    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_pages = rng.standard_normal(shape).astype(np.float32)
    v_pages = rng.standard_normal(shape).astype(np.float32)
    if poison:
        k_pages[~holds_key] = np.nan
        v_pages[~holds_key] = np.nan
    queries = rng.standard_normal((num_tokens, num_q_heads, head_dim)).astype(np.float32)
    return Batch(
        queries=queries,
        k_pages=k_pages,
        v_pages=v_pages,
        kv_lens=kv_lens,
        page_indices=page_indices,
        query_start_loc=query_start_loc,
        num_seqs=np.array([num_real], np.int32),
        dtype=dtype,
    )


def naive_attention(
    batch: Batch,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    causal: bool = True,
) -> np.ndarray:
    """The definition, one token and one head at a time, in float64 (inputs rounded to dtype).

    ``causal=False``: every token sees all ``kv_len`` keys of its sequence.
    """

    def as_f64(x: np.ndarray) -> np.ndarray:
        return np.asarray(jnp.asarray(x, batch.dtype).astype(jnp.float32), np.float64)

    q, k_pages, v_pages = as_f64(batch.queries), as_f64(batch.k_pages), as_f64(batch.v_pages)
    num_tokens, num_q_heads, _ = q.shape
    page_size, num_kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = num_q_heads // num_kv_heads
    out = np.zeros_like(q)
    for s in range(int(batch.num_seqs[0])):
        start, end = int(batch.query_start_loc[s]), int(batch.query_start_loc[s + 1])
        kv_len = int(batch.kv_lens[s])
        if end == start:
            continue
        keys = np.stack(
            [k_pages[batch.page_indices[s, k // page_size], k % page_size] for k in range(kv_len)]
        )
        values = np.stack(
            [v_pages[batch.page_indices[s, k // page_size], k % page_size] for k in range(kv_len)]
        )
        for t in range(start, end):
            position = kv_len - (end - start) + (t - start)
            lo = 0 if sliding_window is None else max(0, position - sliding_window + 1)
            hi = position + 1 if causal else kv_len
            for h in range(num_q_heads):
                kv_head = h // group
                scores = keys[lo:hi, kv_head] @ q[t, h] * sm_scale
                if soft_cap is not None:
                    scores = soft_cap * np.tanh(scores / soft_cap)
                weights = np.exp(scores - scores.max())
                out[t, h] = weights @ values[lo:hi, kv_head] / weights.sum()
    return out


def rel_err(got: object, want: object, num_real_tokens: int) -> float:
    """max|got - want| / max|want| over the real token rows (the DESIGN.md measure)."""
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)[:num_real_tokens]
    want = np.asarray(jnp.asarray(want).astype(jnp.float32), np.float64)[:num_real_tokens]
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def check_padding_rows_zero(out: object, num_real_tokens: int) -> None:
    pad = np.asarray(jnp.asarray(out).astype(jnp.float32))[num_real_tokens:]
    assert np.all(pad == 0.0), "padding token rows must be zero"


def reference_attention(batch: Batch, **kwargs: object) -> object:
    return reference.ragged_paged_attention(*batch.args(), **kwargs)


# Batches whose padding must not leak into real outputs, shared by every kernel's tests:
# (name, [(query_len, kv_len) per sequence], max_num_seqs, num_tokens, sm_scale).
PADDING_CASES = [
    ("garbage_slots", [(1, 40), (6, 6), (1, 3)], 16, 45, 0.1),
    ("no_real_sequences", [], 4, 20, 0.1),
    ("zero_length_sequences", [(3, 10), (0, 0), (0, 7), (2, 2), (0, 4), (9, 20)], None, 16, 0.3),
]
