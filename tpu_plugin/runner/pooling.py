"""Pooling models (``--runner pooling``): embeddings for ``LLM.embed``, ``/v1/embeddings``,
``/score`` and ``/rerank``.

The split of vLLM's pooler between the device and the host:

- **which rows, reduced** (vLLM's "pooling method": ``LAST``, ``MEAN``, ``CLS``) runs inside
  the jitted forward (:func:`pool_step`): one ``[S, hidden]`` float32 array per step instead of
  the ``[T, hidden]`` hidden states — the last row of each request's tokens in this step, its
  first row, or the sum of its rows. vLLM's own methods index the whole hidden-state tensor,
  which would have to leave the device every step, and its ``MEAN``/``CLS`` refuse a prompt
  split over several steps. Here the host keeps per request what the later chunks need
  (:class:`PoolingState`): the running sum (``MEAN`` divides by the prompt length after the
  last chunk), the first chunk's first row (``CLS``), the last chunk's last row (``LAST``).
  With causal attention every row of a chunk is final when it is computed, so a chunked
  prompt pools exactly as an unchunked one.
- **everything after** (vLLM's "head": the sentence-transformers ``Dense`` projection layers,
  ``head_dtype``, Matryoshka ``dimensions``, normalisation, per-request ``use_activation``) is
  vLLM's own ``EmbeddingPoolerHead``, built by vLLM's ``DispatchPooler.for_embedding`` from the
  model config and called on host torch tensors of the finished requests' pooled rows. It is
  pure torch on ``[finished, hidden]``, so reusing it means one definition of those semantics.

The runner's outputs grow one field (``ModelRunnerOutput.pooler_output``); its inputs none: the
rows come from ``logits_indices`` (last token of each request) and ``query_start_loc``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.pool.metadata import PoolingMetadata, PoolingStates

from tpu_kernels.ragged_paged_attention.reference import token_layout

METHODS = ("LAST", "MEAN", "CLS")
# What the worker reports to vLLM (the API server's endpoints follow): sequence embeddings,
# and per-token embeddings (vLLM's ALL token pooling) for LLM.encode / /pooling.
TASKS = ("embed", "token_embed")


def pool_step(hidden: jax.Array, step: Any, method: str) -> jax.Array:
    """``[S, hidden]`` float32: each request's rows of this step, reduced by ``method``.

    ``LAST``: the row of its last token in this step; ``CLS``: of its first; ``MEAN``: the
    sum of its rows (the host divides by the prompt length once every chunk is in). Padding
    rows of the sequence bucket are garbage the host never reads.
    """
    if method == "LAST":
        return hidden[step.logits_indices].astype(jnp.float32)
    md = step.attention
    num_seqs = md.kv_lens.shape[0]
    if method == "CLS":
        return hidden[jnp.minimum(md.query_start_loc[:num_seqs], hidden.shape[0] - 1)].astype(
            jnp.float32
        )
    seq, _, real = token_layout(md.kv_lens, md.query_start_loc, md.num_seqs, hidden.shape[0])
    rows = jnp.where(real[:, None], hidden.astype(jnp.float32), 0.0)
    return jax.ops.segment_sum(rows, seq, num_segments=num_seqs)


def pooling_method(vllm_config: VllmConfig) -> str:
    """The model's sequence pooling method (vLLM resolved it from the sentence-transformers
    config, the user's ``--pooler-config`` or the architecture's default)."""
    return vllm_config.model_config.pooler_config.get_seq_pooling_type()


def is_bidirectional(vllm_config: VllmConfig) -> bool:
    """Whether the model's JAX port attends both ways (an encoder: ``bidirectional``)."""
    from tpu_plugin.models.registry import resolve_model_class

    architectures = list(vllm_config.model_config.architectures or [])
    return bool(getattr(resolve_model_class(architectures), "bidirectional", False))


def check_pooling_config(vllm_config: VllmConfig) -> None:
    """Start-up checks of a pooling model; each error names the fix.

    The port's class says whether it attends both ways (``bidirectional``: encoders, whose
    input must arrive in one step, every row recomputed) and how long an input its position
    table holds (``max_input_len``).
    """
    from tpu_plugin.models.registry import resolve_model_class, select_implementation

    model_config = vllm_config.model_config
    architectures = list(model_config.architectures or [])
    if select_implementation(architectures)[0] == "torchax":
        raise ValueError(
            f"{', '.join(architectures)}: pooling models (--runner pooling) run on the JAX "
            "ports only, not through torchax; use an architecture with a JAX port (README: "
            "Pooling models)"
        )
    model_class = resolve_model_class(architectures)
    bidirectional = is_bidirectional(vllm_config)
    max_len = getattr(model_class, "max_input_len", None)
    max_input_len = max_len(model_config.hf_config) if max_len else model_config.max_model_len
    pooler = model_config.pooler_config
    method = pooler.seq_pooling_type
    if method not in METHODS:
        raise ValueError(
            f"pooling type {method!r} is not supported by tpu-plugin (supported: "
            f'{", ".join(METHODS)}); set --pooler-config \'{{"seq_pooling_type": "MEAN"}}\''
        )
    task = pooler.task
    if task is not None and task not in TASKS:
        raise ValueError(
            f"pooling task {task!r} is not supported by tpu-plugin yet (supported: "
            f"{', '.join(TASKS)}); use an embedding model or --pooler-config task embed"
        )
    if pooler.tok_pooling_type not in (None, "ALL"):
        raise ValueError(
            f"token pooling {pooler.tok_pooling_type!r} is not supported by tpu-plugin (ALL "
            'only); set --pooler-config \'{"tok_pooling_type": "ALL"}\''
        )
    scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
    if bidirectional and scheduler.enable_chunked_prefill:
        raise ValueError(
            f"{model_config.architectures[0]} attends bidirectionally, so an input cannot be "
            "split over steps; drop --enable-chunked-prefill"
        )
    if (bidirectional or method != "LAST") and cache.enable_prefix_caching:
        raise ValueError(
            f"{method} pooling needs the hidden state of every input token, which a prefix "
            "cache hit skips; drop --enable-prefix-caching"
        )
    if model_config.max_model_len > max_input_len:
        raise ValueError(
            f"--max-model-len {model_config.max_model_len} is longer than the model's "
            f"position table holds ({max_input_len} tokens); set --max-model-len "
            f"{max_input_len} or less"
        )


class PooledStep(NamedTuple):
    """The pooling forward's output: per-request rows, and every token's row for ``ALL``."""

    rows: jax.Array  # [S, hidden] float32 (pool_step)
    hidden: jax.Array  # [T, hidden] float32; copied to the host only for token_embed steps


@dataclass
class PoolingState:
    """What a request's later prefill chunks need of its earlier ones (host, float32)."""

    pooled: np.ndarray | None = None  # MEAN: running sum; CLS: the first row
    tokens: list[np.ndarray] = field(default_factory=list)  # token_embed: each chunk's rows


@dataclass
class PoolingRunner:
    """Per-step host side of pooling: carries chunks over, applies vLLM's head when done."""

    vllm_config: VllmConfig
    method: str = ""
    states: dict[str, PoolingState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from vllm.model_executor.layers.pooler import DispatchPooler

        self.method = pooling_method(self.vllm_config)
        # Encoders' attention works over the page table's width (bucket it, model_runner.py).
        self.bidirectional = is_bidirectional(self.vllm_config)
        pooler_config = self.vllm_config.model_config.pooler_config
        with set_current_vllm_config(self.vllm_config):
            dispatch = DispatchPooler.for_embedding(pooler_config)
        self.heads = {task: dispatch.poolers_by_task[task].head for task in TASKS}

    def rows(self, hidden: jax.Array, step: Any) -> PooledStep:
        """Inside the jitted forward: the step's pooled rows (:func:`pool_step`) and all rows
        (they stay on the device unless a ``token_embed`` request needs them)."""
        return PooledStep(pool_step(hidden, step, self.method), hidden.astype(jnp.float32))

    def forget(self, req_id: str) -> None:
        self.states.pop(req_id, None)

    def step_output(
        self,
        pooled_step: PooledStep,
        req_ids: list[str],
        starts: np.ndarray,
        query_lens: np.ndarray,
        prompt_lens: np.ndarray,
        completes: np.ndarray,
        params: list[Any],
    ) -> ModelRunnerOutput:
        """vLLM's output for one step: an embedding for each request whose prompt is done.

        ``starts`` are the requests' first positions in this step (0: a fresh start, also
        after preemption), ``query_lens`` their tokens in it, ``completes`` whether the step
        reaches the end of the prompt.
        """
        host_rows = np.asarray(jax.device_get(pooled_step.rows))[: len(req_ids)]
        token_rows = None
        if any(p.task == "token_embed" for p in params):
            token_rows = np.asarray(jax.device_get(pooled_step.hidden))
        offsets = np.cumsum(query_lens) - query_lens
        finished: list[int] = []
        pooled: list[np.ndarray] = []
        for i, req_id in enumerate(req_ids):
            state = self.states.setdefault(req_id, PoolingState())
            if starts[i] == 0:
                state.pooled, state.tokens = None, []
            if params[i].task == "token_embed":
                state.tokens.append(token_rows[offsets[i] : offsets[i] + query_lens[i]].copy())
            row = host_rows[i].copy()
            if self.method == "MEAN":
                state.pooled = row if state.pooled is None else state.pooled + row
            elif self.method == "CLS" and state.pooled is None:
                state.pooled = row
            if not completes[i]:
                continue
            if params[i].task == "token_embed":
                vector = np.concatenate(state.tokens)
            elif self.method == "LAST":
                vector = row
            elif self.method == "MEAN":
                vector = state.pooled / np.float32(prompt_lens[i])
            else:
                vector = state.pooled
            finished.append(i)
            pooled.append(vector)
            self.states.pop(req_id, None)

        outputs: list[torch.Tensor | None] = [None] * len(req_ids)
        for task in {params[i].task for i in finished}:
            group = [k for k, i in enumerate(finished) if params[i].task == task]
            indices = [finished[k] for k in group]
            metadata = PoolingMetadata(
                prompt_lens=torch.from_numpy(prompt_lens[indices].astype(np.int64)),
                prompt_token_ids=None,
                prompt_token_ids_cpu=None,
                pooling_params=[params[i] for i in indices],
                pooling_states=[PoolingStates() for _ in indices],
            )
            data = [torch.from_numpy(pooled[k]) for k in group]
            with set_current_vllm_config(self.vllm_config):
                # vLLM's heads: a [n, hidden] batch for embed, one [tokens, hidden] each for
                # token_embed
                embedded = self.heads[task](
                    torch.stack(data) if task == "embed" else data, metadata
                )
            for i, vector in zip(indices, embedded, strict=True):
                outputs[i] = vector
        return ModelRunnerOutput(
            req_ids=list(req_ids),
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            pooler_output=outputs,
        )
