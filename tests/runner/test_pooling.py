"""Pooling (runner/pooling.py): the device-side rows, the host's carry over prefill chunks,
and the start-up checks of pooling configurations.

The rows are checked against NumPy on a ragged step with padding; the carry by feeding one
request's chunks through :class:`PoolingRunner` (vLLM's head normalises the result) and
comparing with the unchunked answer. Start-up checks run vLLM's own config creation, which
calls the platform's, in-process.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoModel, BertConfig, GPT2Config, LlamaConfig, XLMRobertaConfig
from vllm.pooling_params import PoolingParams

from tests.conftest import SMALL, make_random_checkpoint
from tpu_plugin.runner.input_batch import InputBatch, RequestState
from tpu_plugin.runner.inputs import prepare_inputs
from tpu_plugin.runner.pooling import PooledStep, PoolingRunner, pool_step

HIDDEN = 8


def ragged_pooling_step(query_lens: list[int], starts: list[int]):
    """A prepared step of pooling requests (no sampling parameters) and its host facts."""
    batch = InputBatch(max_num_reqs=8, max_model_len=64, max_blocks_per_req=16)
    req_ids = [f"r{i}" for i in range(len(query_lens))]
    for i, (req_id, n, start) in enumerate(zip(req_ids, query_lens, starts, strict=True)):
        prompt = list(range(100, 100 + start + n))
        blocks = list(range(4 * i, 4 * i + 4))
        batch.add(RequestState(req_id, prompt, None, blocks, start, pooling_params=PoolingParams()))
    return prepare_inputs(batch, req_ids, query_lens, page_size=4, num_pages=40, max_num_seqs=8)


@pytest.mark.parametrize("method", ["LAST", "CLS", "MEAN"])
def test_pool_step_rows(method):
    query_lens = [3, 1, 6]
    step, host = ragged_pooling_step(query_lens, [0, 5, 2])
    num_tokens = step.input_ids.shape[0]
    assert num_tokens > sum(query_lens)  # padded to the token bucket
    hidden = np.random.default_rng(0).normal(size=(num_tokens, HIDDEN)).astype(np.float32)
    got = np.asarray(pool_step(hidden, step, method))
    assert got.shape == (host.padded_num_seqs, HIDDEN)
    bounds = np.cumsum([0, *query_lens])
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        want = {"LAST": hidden[b - 1], "CLS": hidden[a], "MEAN": hidden[a:b].sum(0)}[method]
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6)


def pooling_engine_config(tmp_path, method: str, config=None, **engine_args):
    """vLLM's config of a pooling engine for a random checkpoint (the platform checks run)."""
    from vllm.config import PoolerConfig
    from vllm.engine.arg_utils import EngineArgs

    if isinstance(config, BertConfig | XLMRobertaConfig):  # encoders: the base model
        AutoModel.from_config(config).save_pretrained(tmp_path)
    else:  # decoders: a causal LM, as vLLM converts them
        make_random_checkpoint(tmp_path, config or LlamaConfig(**SMALL))
    args = EngineArgs(
        model=str(tmp_path),
        runner="pooling",
        skip_tokenizer_init=True,
        pooler_config=PoolerConfig(seq_pooling_type=method),
        **{"max_model_len": 128, **engine_args},
    )
    return args.create_engine_config()


@pytest.mark.parametrize("task", ["embed", "token_embed"])
@pytest.mark.parametrize("method", ["LAST", "CLS", "MEAN"])
def test_chunks_pool_like_one_step(tmp_path, method, task):
    """A 10-token prompt in chunks of 4, 4, 2 gives the unchunked embedding (token_embed: every
    token's); a restart from position 0 (preemption) forgets what the first attempt had."""
    vllm_config = pooling_engine_config(tmp_path, method, enable_prefix_caching=False)
    runner = PoolingRunner(vllm_config)
    params = PoolingParams(task=task)
    params.verify(vllm_config.model_config)
    rows = np.random.default_rng(1).normal(size=(10, HIDDEN)).astype(np.float32)
    reduce = {"LAST": lambda r: r[-1], "CLS": lambda r: r[0], "MEAN": lambda r: r.sum(0)}[method]

    def feed(start: int, stop: int, scale: float = 1.0):
        done = stop == len(rows)
        chunk = rows[start:stop] * scale
        step = PooledStep(rows=reduce(chunk)[None], hidden=chunk)
        lens = np.array([stop - start])
        return runner.step_output(
            step, ["a"], np.array([start]), lens, np.array([10]), np.array([done]), [params]
        ).pooler_output[0]

    assert feed(0, 4, scale=7.0) is None  # an attempt that is preempted after one chunk
    assert feed(0, 4) is None and feed(4, 8) is None
    got = feed(8, 10).numpy()
    if task == "token_embed":
        want = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    else:
        want = {"LAST": rows[-1], "CLS": rows[0], "MEAN": rows.mean(0)}[method]
        want = want / np.linalg.norm(want)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert "a" not in runner.states


ENCODER = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    pad_token_id=1,
    position_embedding_type="absolute",
)


def small_bert() -> BertConfig:
    return BertConfig(**ENCODER, max_position_embeddings=128)


def small_xlm_roberta() -> XLMRobertaConfig:
    return XLMRobertaConfig(**ENCODER, max_position_embeddings=130)


STARTUP_ERRORS = [
    ("encoder-chunked-prefill", "CLS", small_bert, {"enable_chunked_prefill": True},
     "drop --enable-chunked-prefill"),
    ("mean-prefix-caching", "MEAN", None, {"enable_prefix_caching": True},
     "drop --enable-prefix-caching"),
    ("xlm-roberta-positions", "MEAN", small_xlm_roberta, {"max_model_len": 130},
     "set --max-model-len 128 or less"),
    ("torchax-pooling", "LAST", lambda: GPT2Config(n_layer=1, n_embd=32, n_head=2),
     {"convert": "embed"}, "run on the JAX ports only"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "config", "engine_args", "fix"),
    [case[1:] for case in STARTUP_ERRORS],
    ids=[case[0] for case in STARTUP_ERRORS],
)
def test_startup_errors_name_the_fix(tmp_path, method, config, engine_args, fix):
    with pytest.raises(Exception, match=fix):
        pooling_engine_config(tmp_path, method, config() if config else None, **engine_args)
