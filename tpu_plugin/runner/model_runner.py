"""The model runner: orchestration only.

``execute_model`` applies the scheduler's changes to the persistent batch, builds the step's
bucketed arrays and runs the jitted forward pass (logits stay on the device);
``sample_tokens`` runs the jitted sampler on them and reports the tokens to vLLM.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheSpec
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, LogprobsLists, ModelRunnerOutput

from tpu_plugin.models.llama import head_dim_of
from tpu_plugin.models.loader import load_model, resolve_model_dir
from tpu_plugin.runner import kv_cache
from tpu_plugin.runner.compile import enable_persistent_cache
from tpu_plugin.runner.input_batch import InputBatch, RequestState
from tpu_plugin.runner.inputs import HostStep, StepInputs, prepare_inputs
from tpu_plugin.runner.sampler import GREEDY_EPS, SamplingInputs, sample, to_host

logger = init_logger(__name__)


class JaxModelRunner:
    """Runs one native JAX model for vLLM's v1 engine."""

    def __init__(self, vllm_config: VllmConfig):
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.cache_config = vllm_config.cache_config
        self.scheduler_config = vllm_config.scheduler_config
        self.hf_config = self.model_config.hf_text_config
        if self.cache_config.cache_dtype not in ("auto", None):
            raise ValueError(
                f"tpu-plugin supports kv_cache_dtype='auto' only (got "
                f"{self.cache_config.cache_dtype!r}); drop --kv-cache-dtype"
            )
        self.dtype = kv_cache.TORCH_TO_JAX_DTYPE[self.model_config.dtype]
        self.block_size = self.cache_config.block_size
        self.max_num_seqs = self.scheduler_config.max_num_seqs
        self.max_model_len = self.model_config.max_model_len
        self.num_layers = self.hf_config.num_hidden_layers
        self.num_kv_heads = self.hf_config.num_key_value_heads
        self.head_dim = head_dim_of(self.hf_config)

        self.requests: dict[str, RequestState] = {}
        self.batch = InputBatch(
            self.max_num_seqs, self.max_model_len, -(-self.max_model_len // self.block_size)
        )
        self.kv_caches: list[kv_cache.KVCache] = []
        self.num_pages = 0
        self._pending: tuple[jax.Array, HostStep] | None = None
        self._host_rng = np.random.default_rng(self.model_config.seed)
        self.model: nnx.Module | None = None

    # ---- start-up -------------------------------------------------------------------------
    def load_model(self) -> None:
        enable_persistent_cache()
        start = time.perf_counter()
        model_dir = resolve_model_dir(self.model_config.model, self.model_config.revision)
        self.model = load_model(model_dir, self.hf_config, self.dtype)
        graphdef, self.params = nnx.split(self.model)

        def forward(params: Any, kv_caches: list, step: StepInputs) -> tuple[list, jax.Array]:
            model = nnx.merge(graphdef, params)
            kv_caches, hidden = model(kv_caches, step.input_ids, step.positions, step.attention)
            return kv_caches, model.compute_logits(hidden[step.logits_indices])

        self._forward = jax.jit(forward, donate_argnums=(1,))
        logger.info("loaded %s in %.1f s", model_dir, time.perf_counter() - start)

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        return kv_cache.kv_cache_spec(
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.block_size,
            self.model_config.dtype,
        )

    def initialize_kv_cache(self, config: KVCacheConfig) -> None:
        self.kv_caches = kv_cache.allocate(
            config, self.num_layers, self.num_kv_heads, self.head_dim, self.dtype
        )
        self.num_pages = config.num_blocks
        logger.info("KV cache: %d pages of %d tokens per layer", self.num_pages, self.block_size)

    # ---- one step ------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
            self.batch.remove(req_id)
        scheduled = so.num_scheduled_tokens
        for req_id in [r for r in self.batch.req_id_to_slot if r not in scheduled]:
            self.batch.remove(req_id)  # paused or preempted: state kept, slot freed
        if so.kv_cache_block_copies:
            self.kv_caches = kv_cache.copy_blocks(self.kv_caches, so.kv_cache_block_copies)

        for new in so.scheduled_new_reqs:
            if new.sampling_params is None or new.prompt_token_ids is None:
                raise ValueError("tpu-plugin serves token prompts for generation only")
            state = RequestState(
                req_id=new.req_id,
                prompt_token_ids=list(new.prompt_token_ids),
                sampling_params=new.sampling_params,
                block_ids=list(new.block_ids[0]),
                num_computed_tokens=new.num_computed_tokens,
            )
            self.requests[new.req_id] = state
            self.batch.remove(new.req_id)
            self.batch.add(state)

        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests[req_id]
            state.num_computed_tokens = cached.num_computed_tokens[i]
            del state.output_token_ids[cached.num_output_tokens[i] :]
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                state.block_ids.extend(new_blocks[0])
            if req_id not in self.batch:
                self.batch.add(state)
                continue
            slot = self.batch.req_id_to_slot[req_id]
            self.batch.num_computed_tokens[slot] = state.num_computed_tokens
            self.batch.truncate_outputs(slot, len(state.output_token_ids))
            if new_blocks:
                self.batch.append_blocks(slot, new_blocks[0])

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput | None:
        self._update_states(so)
        if so.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        req_ids = list(so.num_scheduled_tokens)
        step, host = prepare_inputs(
            self.batch,
            req_ids,
            [so.num_scheduled_tokens[r] for r in req_ids],
            page_size=self.block_size,
            num_pages=self.num_pages,
            max_num_seqs=self.max_num_seqs,
        )
        self.kv_caches, logits = self._forward(self.params, self.kv_caches, step)
        self._pending = (logits, host)
        return None

    def _sampling_inputs(self, host: HostStep) -> tuple[SamplingInputs, dict[str, Any]]:
        slots, rows, padded = host.slots, len(host.slots), host.padded_num_seqs

        def pad(values: np.ndarray, fill: float | int, dtype: Any) -> np.ndarray:
            out = np.full(padded, fill, dtype)
            out[:rows] = values
            return out

        temperature = self.batch.temperature[slots]
        top_k, top_p = self.batch.top_k[slots], self.batch.top_p[slots]
        seed = self.batch.seed[slots]
        generated = self.batch.num_tokens[slots] - self.batch.num_prompt_tokens[slots]
        fresh = self._host_rng.integers(0, 2**32, rows, dtype=np.uint64)
        inputs = SamplingInputs(
            temperature=pad(temperature, 0.0, np.float32),
            top_k=pad(top_k, 0, np.int32),
            top_p=pad(top_p, 1.0, np.float32),
            seeds=pad(np.where(seed >= 0, seed, fresh).astype(np.uint32), 0, np.uint32),
            draws=pad(np.where(seed >= 0, generated, 0), 0, np.int32),
        )
        requested = int(self.batch.num_logprobs[slots].max(initial=-1))
        flags = {
            "all_greedy": bool(np.all(temperature < GREEDY_EPS)),
            "use_top_k_top_p": bool(np.any(top_k > 0) or np.any(top_p < 1.0)),
            "num_logprobs": 0 if requested < 0 else max(1, self.model_config.max_logprobs),
        }
        return jax.device_put(inputs), flags

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        if self._pending is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        if grammar_output is not None:
            raise RuntimeError("structured output reached the runner; it is not supported yet")
        logits, host = self._pending
        self._pending = None
        params, flags = self._sampling_inputs(host)
        out = to_host(sample(logits, params, **flags), len(host.req_ids))

        sampled_token_ids: list[list[int]] = []
        for i, req_id in enumerate(host.req_ids):
            if not host.completes_prompt[i]:
                sampled_token_ids.append([])  # a prefill chunk that is not the last
                continue
            token = int(out["token_ids"][i])
            self.requests[req_id].output_token_ids.append(token)
            self.batch.append_token(int(host.slots[i]), token)
            sampled_token_ids.append([token])

        logprobs = None
        if out["topk_ids"] is not None:
            logprobs = LogprobsLists(
                logprob_token_ids=np.concatenate(
                    [out["token_ids"][:, None], out["topk_ids"]], axis=1
                ),
                logprobs=np.concatenate(
                    [out["sampled_logprob"][:, None], out["topk_logprobs"]], axis=1
                ),
                sampled_token_ranks=out["sampled_rank"],
            )
        return ModelRunnerOutput(
            req_ids=host.req_ids,
            req_id_to_index={r: i for i, r in enumerate(host.req_ids)},
            sampled_token_ids=sampled_token_ids,
            logprobs=logprobs,
        )
