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
from vllm.v1.outputs import (
    EMPTY_MODEL_RUNNER_OUTPUT,
    DraftTokenIds,
    LogprobsLists,
    ModelRunnerOutput,
)

from tpu_plugin.layers.attention import page_table_width_bucketed
from tpu_plugin.layers.lora import token_adapters
from tpu_plugin.layers.moe_offload import map_kv_layers
from tpu_plugin.models import quantization
from tpu_plugin.models.loader import load_model, resolve_model_dir
from tpu_plugin.models.quantization import Quantization
from tpu_plugin.models.registry import select_implementation
from tpu_plugin.parallel import ShardingPlan, plan_for
from tpu_plugin.parallel.shard_kernels import sharded_step
from tpu_plugin.runner import kv_cache
from tpu_plugin.runner.async_output import AsyncStepOutput, record_tokens, start_host_copy
from tpu_plugin.runner.compile import (
    LazyCompiles,
    count_backend_compiles,
    enable_persistent_cache,
    logprobs_width,
    run_sampler,
    runtime_sampler_flags,
    step_key,
)
from tpu_plugin.runner.expert_cache import ExpertOffload
from tpu_plugin.runner.input_batch import InputBatch, RequestState
from tpu_plugin.runner.inputs import (
    HostStep,
    StepInputs,
    merge_plan,
    merge_prev_tokens,
    prepare_inputs,
)
from tpu_plugin.runner.lora import LoRARunner
from tpu_plugin.runner.pooling import TASKS as POOLING_TASKS
from tpu_plugin.runner.pooling import PoolingRunner
from tpu_plugin.runner.prompt_logprobs import (
    PromptLogprobRows,
    add_prompt_logit_rows,
    collect_prompt_logprobs,
)
from tpu_plugin.runner.sampler import GREEDY_EPS, SamplingInputs, to_host
from tpu_plugin.runner.spec_decode import SpecDecoder, SpecPlan
from tpu_plugin.startup import StartupError

logger = init_logger(__name__)


def quantization_of(vllm_config: VllmConfig, model_impl: str, latent_kv: bool) -> Quantization:
    """The run's quantization (``--quantization`` or the checkpoint's, ``--kv-cache-dtype``),
    or the start-up error that names what is supported."""
    model_config = vllm_config.model_config
    quant = quantization.from_config(
        model_config.hf_text_config,
        model_config.quantization,
        vllm_config.cache_config.cache_dtype,
    )
    if model_impl == "torchax" and (quant.method or quant.kv_cache_dtype is not None):
        raise quantization.QuantizationError(
            "quantized weights and an fp8 KV cache run on the JAX ports only, not through "
            "torchax; drop --quantization / --kv-cache-dtype"
        )
    if latent_kv and quant.kv_cache_dtype is not None:
        raise quantization.QuantizationError(
            "an fp8 KV cache is not supported for multi-head latent attention (DeepSeek-V3) "
            "yet; drop --kv-cache-dtype"
        )
    return quant


def jitted_forward(
    graphdef: nnx.GraphDef,
    plan: ShardingPlan,
    pooling: PoolingRunner | None = None,
    offload: ExpertOffload | None = None,
) -> Any:
    """The jitted step of a native model: ``(params, kv_caches, step) -> (kv_caches, logits)``.

    The runner calls it with the loaded parameters, the TPU planner
    (``tpu_plugin.tools.plan``) with abstract ones on a TPU topology: one definition, so
    what the planner compiles is what serving runs. The KV pages are donated (updated in
    place); the logits come back replicated over the mesh for the sampler. A pooling model's
    step returns its pooled rows instead of logits (``pooling.py``). With MoE offload
    (``expert_cache.py``) ``params`` also holds the host experts and ``kv_caches`` the device
    expert cache, donated with the pages.
    """

    def forward(params: Any, kv_caches: list, step: StepInputs) -> tuple[list, Any]:
        step = merge_prev_tokens(step)
        model = nnx.merge(graphdef, params)
        # Mosaic kernels run per device (parallel/shard_kernels.py); LoRA slots per token
        with sharded_step(plan), token_adapters(step.lora_slots):
            kv_caches, hidden = model(kv_caches, step.input_ids, step.positions, step.attention)
            if pooling is not None:
                return plan.constrain_kv(kv_caches), pooling.rows(hidden, step)
            logits = model.compute_logits(hidden[step.logits_indices])
        return plan.constrain_kv(kv_caches), plan.logits(logits)

    if offload is not None:  # routed experts from host memory (layers/moe_offload.py)
        forward = offload.wrap(forward)
    return jax.jit(forward, donate_argnums=(1,))


class JaxModelRunner:
    """Runs one native JAX model for vLLM's v1 engine."""

    def __init__(self, vllm_config: VllmConfig):
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.cache_config = vllm_config.cache_config
        self.scheduler_config = vllm_config.scheduler_config
        self.hf_config = self.model_config.hf_text_config
        if self.model_config.logits_processors:
            raise ValueError(
                "tpu-plugin's jitted sampler cannot run custom torch logits processors; "
                "drop --logits-processors"
            )
        self.dtype = kv_cache.TORCH_TO_JAX_DTYPE[self.model_config.dtype]
        self.block_size = self.cache_config.block_size
        self.max_num_seqs = self.scheduler_config.max_num_seqs
        self.max_model_len = self.model_config.max_model_len
        self.model_impl = select_implementation(list(self.model_config.architectures or []))[0]
        if self.model_impl == "torchax":  # vLLM's PyTorch model: its config accessors
            from tpu_plugin.models.torchax import kv_cache_dims

            self.num_layers, self.num_kv_heads, self.head_dim = kv_cache_dims(vllm_config)
            self.latent_kv = False
        else:
            self.num_layers = self.hf_config.num_hidden_layers
            # The model's page layout (K/V pairs, or MLA's latent array), see kv_cache.py.
            self.num_kv_heads, self.head_dim, self.latent_kv = kv_cache.cache_layout(self.hf_config)
        # Quantized weights and the KV cache's dtype (models/quantization.py); start-up errors.
        self.quant = quantization_of(vllm_config, self.model_impl, self.latent_kv)
        self.kv_dtype = self.quant.kv_cache_dtype or self.dtype

        # Pooling models (pooling.py): the forward returns pooled rows, not logits.
        self.pooling = (
            PoolingRunner(vllm_config) if self.model_config.runner_type == "pooling" else None
        )
        # Modules never run, so never loaded (embedding checkpoints often have no lm_head).
        self.unused_modules = ("lm_head",) if self.pooling else ()
        self.requests: dict[str, RequestState] = {}
        self.batch = InputBatch(
            self.max_num_seqs,
            self.max_model_len,
            -(-self.max_model_len // self.block_size),
            vocab_size=self.model_config.get_vocab_size(),
        )
        self._prompt_rows: PromptLogprobRows | None = None
        # Speculative decoding (spec_decode.py): n-gram drafts verified in the step's forward.
        self._spec = SpecDecoder(vllm_config) if vllm_config.speculative_config else None
        self._spec_plan: SpecPlan | None = None
        self.kv_caches: list[kv_cache.KVCache] = []
        self.num_pages = 0
        self._pending: tuple[jax.Array, HostStep] | None = None
        self._host_rng = np.random.default_rng(self.model_config.seed)
        self._lazy = LazyCompiles()  # programs compiled while serving (logged once each)
        self.model: nnx.Module | None = None
        self.lora: LoRARunner | None = None  # --enable-lora (runner/lora.py)
        self._offload: ExpertOffload | None = None
        # Page-table widths are bucketed only where attention's work grows with the width
        # (MLA's latent attention, layers/mla.py, and encoders' window, always do).
        encoder = self.pooling is not None and self.pooling.bidirectional
        self.bucket_page_widths = self.latent_kv or encoder or page_table_width_bucketed()

    # ---- start-up -------------------------------------------------------------------------
    def load_model(self) -> None:
        enable_persistent_cache()
        count_backend_compiles()
        # Sampler programs by shape and flags (precompile.precompile, compile.run_sampler).
        self._compiled_samplers: dict[tuple, Any] = {}
        start = time.perf_counter()
        # Async scheduling (async_output.py): the last sampled token of every slot stays on
        # the device; the step whose host bookkeeping has not run yet, and its tokens' places.
        # (pooling: no sampled tokens to carry over)
        self.async_scheduling = bool(self.scheduler_config.async_scheduling) and not self.pooling
        self._last_tokens = jax.device_put(np.zeros(self.max_num_seqs, np.int32))
        self._unresolved: AsyncStepOutput | None = None
        self._unresolved_tokens: dict[str, tuple[int, int]] = {}
        model_dir = resolve_model_dir(self.model_config.model, self.model_config.revision)
        if self.model_impl == "torchax":  # vLLM's PyTorch model through torchax, same contract
            from tpu_plugin.models.torchax import load_torchax_model

            self.sharding_plan = getattr(self, "sharding_plan", None) or plan_for(self.vllm_config)
            if ExpertOffload.for_runner(self, self.sharding_plan) is not None:
                raise StartupError(
                    "MoE offload runs the JAX ports only and this model runs through torchax; "
                    "unset TPU_PLUGIN_MOE_OFFLOAD / --additional-config moe_offload"
                )
            self.model, self.params, torchax_forward = load_torchax_model(
                self.vllm_config, self.sharding_plan
            )

            def forward(params: Any, kv_caches: list, step: StepInputs) -> tuple[list, jax.Array]:
                return torchax_forward(params, kv_caches, merge_prev_tokens(step))

            self._forward = jax.jit(forward, donate_argnums=(1,))
            self._aot_forward, self._compiled = self._forward, {}
            logger.info("loaded %s (torchax) in %.1f s", model_dir, time.perf_counter() - start)
            return
        plan = getattr(self, "sharding_plan", None) or plan_for(self.vllm_config)
        self.sharding_plan = plan
        # MoE offload (expert_cache.py): routed experts loaded into host memory, not here.
        offload = self._offload = ExpertOffload.for_runner(self, plan)
        host = offload.is_routed_expert if offload else None
        self.model = load_model(
            model_dir,
            self.hf_config,
            self.dtype,
            drop=self.unused_modules,
            host=host,
            quant=self.quant,
        )
        host_experts = offload.take_experts(self.model) if offload else None
        if self.vllm_config.lora_config is not None:  # adapter slots in the parameter tree
            self.lora = LoRARunner(self.vllm_config, self.model, self.dtype)
        graphdef, self.params = nnx.split(self.model)
        pooling = self.pooling
        # Tensor/expert parallelism: parameters onto the mesh (tpu_plugin/parallel/sharding.py).
        self.params = plan.shard_params(self.params)
        if self.lora is not None:
            self.lora.bind(self.params)
        if offload:
            self.params = (self.params, host_experts)

        self._forward = jitted_forward(graphdef, plan, pooling, offload)
        # Precompiled forward programs by step shape (precompile.precompile); Ray's wrapper below
        # converts inputs, so multi-process runs compile on first use instead.
        self._aot_forward = None if plan.multi_process else self._forward
        self._compiled: dict[tuple[int, ...], Any] = {}
        if plan.multi_process:  # Ray: global inputs in, this process's logits out
            jitted = self._forward

            def run(params: Any, kv_caches: list, step: StepInputs) -> tuple[list, jax.Array]:
                kv_caches, logits = jitted(params, kv_caches, plan.put_inputs(step))
                return kv_caches, plan.local_result(logits)

            self._forward = run
        logger.info("loaded %s in %.1f s", model_dir, time.perf_counter() - start)

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        return kv_cache.kv_cache_spec(
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.block_size,
            kv_cache.torch_dtype(self.kv_dtype),
            latent=self.latent_kv,
        )

    def initialize_kv_cache(self, config: KVCacheConfig) -> None:
        self.kv_caches = kv_cache.allocate(
            config,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.kv_dtype,
            sharding=self.sharding_plan.kv_sharding,
            latent=self.latent_kv,
        )
        if self._offload is not None:  # the device expert cache rides with the pages
            self.kv_caches = self._offload.attach(self.kv_caches)
        self.num_pages = config.num_blocks
        logger.info("KV cache: %d pages of %d tokens per layer", self.num_pages, self.block_size)

    # ---- one step ------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        if self.lora is not None:
            self.lora.track(so)
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
            if self.pooling is not None:
                self.pooling.forget(req_id)
            self.batch.remove(req_id)
        scheduled = so.num_scheduled_tokens
        for req_id in [r for r in self.batch.req_id_to_slot if r not in scheduled]:
            self.batch.remove(req_id)  # paused or preempted: state kept, slot freed
        if so.kv_cache_block_copies:
            copies = so.kv_cache_block_copies
            self.kv_caches = map_kv_layers(
                self.kv_caches, lambda pages: kv_cache.copy_blocks(pages, copies)
            )

        for new in so.scheduled_new_reqs:
            if new.prompt_token_ids is None or (
                new.sampling_params is None and new.pooling_params is None
            ):
                raise ValueError("tpu-plugin serves token prompts (no prompt embeddings)")
            state = RequestState(
                req_id=new.req_id,
                prompt_token_ids=list(new.prompt_token_ids),
                sampling_params=new.sampling_params,
                block_ids=list(new.block_ids[0]),
                num_computed_tokens=new.num_computed_tokens,
                pooling_params=new.pooling_params,
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
        if self._spec is not None:
            self._spec.write_drafts(self.batch, so)
        step, host = prepare_inputs(
            self.batch,
            req_ids,
            [so.num_scheduled_tokens[r] for r in req_ids],
            page_size=self.block_size,
            num_pages=self.num_pages,
            max_num_seqs=self.max_num_seqs,
            bucket_widths=self.bucket_page_widths,
        )
        if self.lora is not None:  # each token's adapter slot
            scheduled = [so.num_scheduled_tokens[r] for r in req_ids]
            step = self.lora.step_slots(step, req_ids, scheduled)
        if self._offload is not None:  # the step's rows -> batch slots, for the histories
            self.kv_caches = self._offload.prepare(self.kv_caches, host)
        if self.pooling is not None:  # embeddings: no sampling step follows
            return self._pool(step, host, [so.num_scheduled_tokens[r] for r in req_ids])
        if self.async_scheduling:
            step = merge_plan(
                step,
                host,
                self.batch,
                [so.num_scheduled_tokens[r] for r in req_ids],
                self._unresolved_tokens,
                self._last_tokens,
            )
        step, self._prompt_rows = add_prompt_logit_rows(
            step, host, self.batch, so.num_scheduled_tokens
        )
        if self._spec is not None:  # draft positions' logits rows (after the prompt ones)
            step, self._spec_plan = self._spec.add_rows(step, host, so)
        forward = self._compiled.get(step_key(step))
        if forward is None:
            if self._compiled:  # precompiled, but not this shape (prompt or draft rows)
                self._lazy.note("forward", step_key(step))
            forward = self._forward
        self.kv_caches, logits = forward(self.params, self.kv_caches, step)
        self._pending = (logits, host)
        return None

    def _pool(
        self, step: StepInputs, host: HostStep, num_scheduled: list[int]
    ) -> ModelRunnerOutput:
        """Runs a pooling step; finished prompts get their embedding (pooling.py)."""
        forward = self._compiled.get(step_key(step), self._forward)
        starts = self.batch.num_computed_tokens[host.slots]
        self.kv_caches, pooled = forward(self.params, self.kv_caches, step)
        return self.pooling.step_output(
            pooled,
            host.req_ids,
            starts,
            np.asarray(num_scheduled, np.int32),
            self.batch.num_prompt_tokens[host.slots],
            host.completes_prompt,
            [self.requests[r].pooling_params for r in host.req_ids],
        )

    def supported_tasks(self) -> tuple[str, ...]:
        """What vLLM may ask of this engine: generation, or the pooling tasks."""
        return POOLING_TASKS if self.pooling is not None else ("generate",)

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
        requested = int(self.batch.num_logprobs[slots].max(initial=-1))
        runtime = runtime_sampler_flags()  # CPU: one program decides greedy/top-k/logprobs
        want_logprobs = pad(self.batch.num_logprobs[slots] >= 0, False, bool) if runtime else None
        inputs = SamplingInputs(
            temperature=pad(temperature, 0.0, np.float32),
            top_k=pad(top_k, 0, np.int32),
            top_p=pad(top_p, 1.0, np.float32),
            seeds=pad(np.where(seed >= 0, seed, fresh).astype(np.uint32), 0, np.uint32),
            draws=pad(np.where(seed >= 0, generated, 0), 0, np.int32),
            want_logprobs=want_logprobs,
            **self.batch.processor_inputs(slots, padded),
        )
        # One width for every step (top max_logprobs) unless a request asks for more (-1: all).
        width = logprobs_width(self.model_config.max_logprobs, self.batch.vocab_size, requested)
        flags = {
            "all_greedy": bool(np.all(temperature < GREEDY_EPS)),
            "use_top_k_top_p": bool(np.any(top_k > 0) or np.any(top_p < 1.0)),
            "num_logprobs": width if requested >= 0 or runtime else 0,
            "logprobs_mode": self.model_config.logprobs_mode,
        }
        return inputs, flags

    def _grammar_bitmask(self, host: HostStep, grammar: GrammarOutput) -> np.ndarray:
        """The scheduler's bitmask rows (in its request order) moved to this step's rows."""
        row_of = {req_id: i for i, req_id in enumerate(host.req_ids)}
        rows = np.fromiter(
            (row_of.get(r, -1) for r in grammar.structured_output_request_ids), np.int64
        )
        bitmask = np.full((host.padded_num_seqs, grammar.grammar_bitmask.shape[1]), -1, np.int32)
        source = np.arange(len(rows))
        if self._spec_plan is not None:  # with drafts: 1 + drafts rows per request
            source = self._spec_plan.grammar_rows(grammar.structured_output_request_ids)
        bitmask[rows[rows >= 0]] = grammar.grammar_bitmask[source][rows >= 0]
        return bitmask

    def sample_tokens(
        self, grammar_output: GrammarOutput | None
    ) -> ModelRunnerOutput | AsyncStepOutput:
        if self._unresolved is not None:  # async: the previous step's tokens, for the history
            self._unresolved.get_output()
        if self._pending is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        logits, host = self._pending
        self._pending = None
        params, flags = self._sampling_inputs(host)
        if grammar_output is not None:
            params = params._replace(bitmask=self._grammar_bitmask(host, grammar_output))
        params = jax.device_put(params)
        sampled = run_sampler(self._compiled_samplers, logits, params, flags, self._lazy)
        if sampled.topk_ids is not None and not np.any(self.batch.num_logprobs[host.slots] >= 0):
            # computed only as zeros (params.want_logprobs): nobody asked
            sampled = sampled._replace(
                topk_ids=None, topk_logprobs=None, sampled_logprob=None, sampled_rank=None
            )
        plan, self._spec_plan = self._spec_plan, None
        spec_tokens = None
        if plan is not None and plan.num_rows:
            spec_tokens = self._spec.verify(logits, sampled.token_ids, plan, params, flags)
            logits = logits[: logits.shape[0] - plan.num_rows]  # the prompt rows end here
        prompt_logprobs = {}
        if self._prompt_rows is not None:
            prompt_logprobs = collect_prompt_logprobs(
                logits,
                self._prompt_rows,
                host,
                self.batch,
                self.requests,
                self.model_config.logprobs_mode,
            )
            self._prompt_rows = None
        if self.async_scheduling:
            return self._async_output(sampled, host, prompt_logprobs)
        out = to_host(sampled, len(host.req_ids))
        if spec_tokens is not None:  # every request's accepted drafts + one token
            out["spec_tokens"] = self._spec.tokens_to_host(spec_tokens, len(host.req_ids))
        return self._step_output(out, host, prompt_logprobs)

    def _async_output(self, sampled: Any, host: HostStep, prompt_logprobs: dict) -> AsyncStepOutput:
        """Keeps the sampled ids on the device for the next step; the host copy runs later."""
        sampling = host.completes_prompt
        slots = np.full(host.padded_num_seqs, self.max_num_seqs, np.int32)
        slots[: len(host.slots)] = np.where(sampling, host.slots, self.max_num_seqs)
        self._last_tokens = record_tokens(
            self._last_tokens, jax.device_put(slots), sampled.token_ids
        )
        self._unresolved_tokens = {
            req_id: (int(slot), int(self.batch.num_tokens[slot]))
            for req_id, slot, samples in zip(host.req_ids, host.slots, sampling, strict=True)
            if samples
        }
        start_host_copy(sampled)

        def finish() -> ModelRunnerOutput:
            self._unresolved, self._unresolved_tokens = None, {}
            return self._step_output(to_host(sampled, len(host.req_ids)), host, prompt_logprobs)

        self._unresolved = AsyncStepOutput(finish)
        return self._unresolved

    def _step_output(
        self, out: dict[str, np.ndarray | None], host: HostStep, prompt_logprobs: dict
    ) -> ModelRunnerOutput:
        """Host bookkeeping of a sampled step and vLLM's output for it."""
        sampled_token_ids: list[list[int]] = []
        for i, req_id in enumerate(host.req_ids):
            if not host.completes_prompt[i]:
                sampled_token_ids.append([])  # a prefill chunk that is not the last
                continue
            tokens = [int(out["token_ids"][i])]
            if "spec_tokens" in out:
                tokens = out["spec_tokens"][i]
            state = self.requests.get(req_id)  # async: it may have finished meanwhile
            if state is not None:
                state.output_token_ids.extend(tokens)
            if self.batch.req_id_to_slot.get(req_id) == int(host.slots[i]):
                for token in tokens:
                    self.batch.append_token(int(host.slots[i]), token)
            sampled_token_ids.append(tokens)
        if self._spec is not None:  # the next step's drafts, from the tokens just appended
            self._spec.propose(self.batch, host, sampled_token_ids)

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
            prompt_logprobs_dict=prompt_logprobs,
        )

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        """The n-gram drafts proposed after the last step (vLLM's engine asks once a step)."""
        return self._spec.take_draft_token_ids() if self._spec is not None else None
