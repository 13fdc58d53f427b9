"""Top-k expert selection for the MoE families the plugin serves (router logits -> weights, ids).

One function covers the three routing schemes in use, following Hugging Face transformers:

- Qwen2/3-MoE (``scoring="softmax"``): softmax over all experts, take the top k probabilities,
  renormalise them to sum to 1 when ``norm_topk_prob`` (``renormalize``) is set.
- Mixtral (``scoring="softmax", renormalize=True``): HF takes softmax, top-k and renormalises;
  that equals a softmax over the top-k logits.
- DeepSeek-V3 (``scoring="sigmoid"`` with ``correction_bias``, ``num_groups``, ``topk_groups``,
  ``routed_scaling_factor``): sigmoid scores; the *selection* uses the scores plus the
  ``e_score_correction_bias``, limited to the ``topk_groups`` best expert groups (a group's score
  is the sum of its two best biased scores); the *weights* are the unbiased scores of the chosen
  experts, renormalised when ``renormalize``, then multiplied by ``routed_scaling_factor``.

Everything is computed in float32 whatever the logits' dtype, so routing decisions do not
depend on the model's activation dtype (HF also routes in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

SCORINGS = ("softmax", "sigmoid")


def select_experts(
    router_logits: jax.Array,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: jax.Array | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Chooses ``top_k`` experts per token; returns (weights ``[T, k]`` f32, ids ``[T, k]`` i32).

    ``router_logits`` is ``[T, E]``. The ids of a token are ordered by descending selection score
    (the order does not change the MoE output). Grouped selection needs both ``num_groups`` and
    ``topk_groups``; ``E`` must divide into ``num_groups`` groups of at least two experts.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    num_tokens, num_experts = router_logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the {num_experts} experts")
    if (num_groups is None) != (topk_groups is None):
        raise ValueError("grouped routing needs both num_groups and topk_groups (or neither)")
    logits = router_logits.astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)

    choice = scores
    if correction_bias is not None:
        if correction_bias.shape != (num_experts,):
            raise ValueError(
                f"correction_bias must have shape ({num_experts},), got {correction_bias.shape}"
            )
        choice = choice + correction_bias.astype(jnp.float32)[None, :]

    if num_groups is not None and num_groups > 1:
        if num_experts % num_groups or num_experts // num_groups < 2:
            raise ValueError(
                f"{num_experts} experts do not split into {num_groups} groups of >= 2 experts"
            )
        per_group = num_experts // num_groups
        if not 1 <= topk_groups <= num_groups or topk_groups * per_group < top_k:
            raise ValueError(
                f"topk_groups={topk_groups} must be between 1 and {num_groups} and its groups "
                f"must hold at least top_k={top_k} experts"
            )
        grouped = choice.reshape(num_tokens, num_groups, per_group)
        group_scores = lax.top_k(grouped, 2)[0].sum(axis=-1)  # [T, G]
        _, best_groups = lax.top_k(group_scores, topk_groups)  # [T, topk_groups]
        keep = jnp.zeros((num_tokens, num_groups), jnp.bool_)
        keep = keep.at[jnp.arange(num_tokens)[:, None], best_groups].set(True)
        keep = jnp.repeat(keep, per_group, axis=1)
        choice = jnp.where(keep, choice, -jnp.inf)

    _, ids = lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if renormalize:
        # DeepSeek's guard against an all-zero sum (sigmoid scores can underflow); softmax
        # probabilities of the top experts never sum to zero, so HF adds nothing there.
        eps = 1e-20 if scoring == "sigmoid" else 0.0
        weights = weights / (weights.sum(axis=-1, keepdims=True) + eps)
    if routed_scaling_factor != 1.0:
        weights = weights * jnp.float32(routed_scaling_factor)
    return weights, ids.astype(jnp.int32)
