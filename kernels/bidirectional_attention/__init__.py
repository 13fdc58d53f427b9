"""Bidirectional attention of a packed step of whole sequences (encoders), without KV pages.

An encoder (BERT, XLM-RoBERTa) sees each input whole in one step, so its keys and values are
exactly the step's own: no cache read is needed. The layout:

- ``q``: ``[num_tokens, num_q_heads, head_dim]``, ``k`` / ``v``: ``[num_tokens, num_kv_heads,
  head_dim]``, sequences packed one after another; tokens at or past
  ``query_start_loc[num_seqs]`` are padding (their output rows are zero).
- ``query_start_loc``: ``[max_num_seqs + 1]`` int32, ``num_seqs``: ``[1]`` int32, as in
  ``tpu_kernels.ragged_paged_attention``.
- ``max_seq_len``: a static bound on every sequence's length.

Every token attends all tokens of its own sequence (grouped-query heads as in the paged
kernels). The specification is ``ragged_paged_attention.reference`` with ``causal=False`` on a
step whose ``kv_lens`` equal its query lengths; ``xla.py`` is the implementation (pure
``jax.numpy``, every backend), tested against it.
"""
