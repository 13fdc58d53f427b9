"""Fused mixture-of-experts: top-k routing and the routed experts' gated MLPs in one call.

The layout shared by every implementation (``reference``, ``xla``, ``tpu``):

- ``x``: ``[T, H]`` tokens (hidden states), any float dtype.
- ``weights``: ``[T, k]`` float32 routing weights and ``expert_ids``: ``[T, k]`` int32, as
  returned by ``routing.select_experts``. An id outside ``[0, E)`` contributes nothing (so a
  caller can drop assignments, e.g. experts that live on another device).
- ``w_gate_up``: ``[E, 2 * I, H]`` in Hugging Face ``[out, in]`` layout: rows ``0 .. I-1`` are
  ``gate_proj``, rows ``I .. 2I-1`` are ``up_proj`` (HF's fused ``experts.gate_up_proj``).
- ``w_down``: ``[E, H, I]`` (HF's ``experts.down_proj``).

Output ``[T, H]`` in ``x.dtype``: ``sum_j weights[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t))``
with ``e = expert_ids[t, j]``, accumulated in float32. The activated intermediate is rounded to
the weights' dtype before the down projection (what a bf16 model does on every backend).
"""

from .routing import select_experts

__all__ = ["select_experts"]
