"""Ragged paged attention: one call attends a packed mix of prefill chunks and decodes.

The layout shared by every implementation (``reference``, ``tpu``, ``gpu``):

- ``queries``: ``[num_tokens, num_q_heads, head_dim]``, the step's tokens packed sequence after
  sequence; tokens at or past ``query_start_loc[num_seqs]`` are padding.
- ``k_pages`` / ``v_pages``: ``[num_pages, page_size, num_kv_heads, head_dim]`` per layer.
- ``kv_lens``: ``[max_num_seqs]`` int32, each sequence's KV length *including* this step's tokens.
- ``page_indices``: ``[max_num_seqs, pages_per_seq]`` int32, the pages of each sequence in order.
- ``query_start_loc``: ``[max_num_seqs + 1]`` int32, cumulative query offsets (``[0] == 0``).
- ``num_seqs``: ``[1]`` int32, how many rows of the three arrays above are real.

Query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)`` (grouped-query attention).
A query at absolute position ``p`` attends keys ``k <= p`` (causal), and with a sliding window
``W`` only keys ``k > p - W``. The soft cap, when set, maps a scaled score ``s`` to
``cap * tanh(s / cap)`` before the softmax. The reference alone also takes ``causal=False``
(encoders: every token sees all ``kv_lens`` keys of its sequence); the TPU and GPU kernels
refuse it by name.
"""
