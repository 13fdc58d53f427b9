"""Fused MoE: routing vs independent NumPy and Hugging Face routers; xla and tpu vs the reference.

- Routing (``routing.select_experts``) is checked against a per-token NumPy implementation of
  each scheme and against the HF transformers routers it mirrors (Qwen3-MoE, Mixtral,
  DeepSeek-V3), comparing each token's expert set and its weights.
- The reference (the spec) is checked against HF's whole Qwen3-MoE sparse block in float32.
- ``xla.fused_moe`` and ``tpu.fused_moe`` (Mosaic Pallas in TPU interpret mode on CPU) are
  checked against the reference: relative error ``max|got - want| / max|want|`` within 1e-5 for
  float32 and 1e-2 for bfloat16, on fresh random inputs per case, including experts with no
  tokens, every token on one expert, duplicate and dropped ids, T not a multiple of the tile and
  top_k 1/2/8. Interpret mode fills unwritten buffers with NaN and raises on out-of-bounds
  reads, so a forgotten row or a bad block index fails. The larger sweep is ``slow``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from moe_inputs import make_problem, rel_err, seed_of, tol_of

from tpu_kernels.fused_moe import reference, routing, tpu, xla

INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")


# ---------------------------------------------------------------- routing


def numpy_routing(logits, top_k, *, scoring, renormalize, bias, groups, topk_groups, scale):
    """One token at a time, the way the model cards describe it."""
    logits = np.asarray(logits, np.float64)
    weights, ids = [], []
    for row in logits:
        if scoring == "softmax":
            scores = np.exp(row - row.max())
            scores /= scores.sum()
        else:
            scores = 1.0 / (1.0 + np.exp(-row))
        choice = scores + (0.0 if bias is None else np.asarray(bias, np.float64))
        allowed = np.ones(len(row), bool)
        if groups:
            per = len(row) // groups
            group_score = [
                np.sort(choice[g * per : (g + 1) * per])[-2:].sum() for g in range(groups)
            ]
            best = np.argsort(group_score)[::-1][:topk_groups]
            allowed = np.repeat(np.isin(np.arange(groups), best), per)
        order = [e for e in np.argsort(-choice, kind="stable") if allowed[e]][:top_k]
        w = scores[order]
        if renormalize:
            w = w / w.sum()
        weights.append(w * scale)
        ids.append(order)
    return np.array(weights), np.array(ids)


def assert_same_routing(got_w, got_ids, want_w, want_ids, tol=1e-6):
    """Same expert set per token, same weight per expert (order within a token is free)."""
    got_w, got_ids = np.asarray(got_w, np.float64), np.asarray(got_ids)
    want_w, want_ids = np.asarray(want_w, np.float64), np.asarray(want_ids)
    g, w = np.argsort(got_ids, axis=1), np.argsort(want_ids, axis=1)
    np.testing.assert_array_equal(
        np.take_along_axis(got_ids, g, 1), np.take_along_axis(want_ids, w, 1)
    )
    np.testing.assert_allclose(
        np.take_along_axis(got_w, g, 1), np.take_along_axis(want_w, w, 1), rtol=tol, atol=tol
    )


ROUTING_CASES = {
    # name: (experts, top_k, kwargs)
    "qwen3_norm": (16, 8, dict(scoring="softmax", renormalize=True)),
    "qwen3_no_norm": (16, 2, dict(scoring="softmax", renormalize=False)),
    "top1": (8, 1, dict(scoring="softmax", renormalize=False)),
    "sigmoid_plain": (12, 3, dict(scoring="sigmoid", renormalize=True)),
    "deepseek_v3": (
        16,
        4,
        dict(scoring="sigmoid", num_groups=4, topk_groups=2, routed_scaling_factor=2.5),
    ),
    "deepseek_v3_no_norm": (
        16,
        6,
        dict(scoring="sigmoid", renormalize=False, num_groups=8, topk_groups=3),
    ),
}


@pytest.mark.parametrize("name", sorted(ROUTING_CASES))
def test_routing_matches_numpy(name):
    experts, top_k, kwargs = ROUTING_CASES[name]
    k1, k2 = jax.random.split(jax.random.key(seed_of("routing", name)))
    logits = jax.random.normal(k1, (37, experts)) * 2.0
    bias = None
    if kwargs.get("scoring") == "sigmoid":
        bias = jax.random.uniform(k2, (experts,), minval=-0.3, maxval=0.3)
    weights, ids = routing.select_experts(logits, top_k, correction_bias=bias, **kwargs)
    assert weights.dtype == jnp.float32 and ids.dtype == jnp.int32
    assert weights.shape == ids.shape == (37, top_k)
    want_w, want_ids = numpy_routing(
        logits,
        top_k,
        scoring=kwargs["scoring"],
        renormalize=kwargs.get("renormalize", True),
        bias=bias,
        groups=kwargs.get("num_groups"),
        topk_groups=kwargs.get("topk_groups"),
        scale=kwargs.get("routed_scaling_factor", 1.0),
    )
    assert_same_routing(weights, ids, want_w, want_ids)


def test_routing_of_bf16_logits_is_float32():
    logits = jax.random.normal(jax.random.key(seed_of("bf16_logits")), (9, 8)).astype(jnp.bfloat16)
    weights, ids = routing.select_experts(logits, 2)
    want_w, want_ids = routing.select_experts(logits.astype(jnp.float32), 2)
    assert weights.dtype == jnp.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_w, rtol=1e-6)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scoring="relu"), "scoring"),
        (dict(num_groups=4), "both"),
        (dict(num_groups=3, topk_groups=1), "groups"),
        (dict(num_groups=4, topk_groups=1), "at least top_k"),
        (dict(correction_bias=jnp.zeros(5)), "correction_bias"),
    ],
)
def test_routing_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        routing.select_experts(jnp.zeros((2, 8)), 4, **kwargs)


def _hf_router(family: str, experts: int, top_k: int, hidden: int, **extra):
    import torch

    if family == "qwen3_moe":
        from transformers.models.qwen3_moe import configuration_qwen3_moe as c
        from transformers.models.qwen3_moe import modeling_qwen3_moe as m

        config = c.Qwen3MoeConfig(
            hidden_size=hidden, num_experts=experts, num_experts_per_tok=top_k, **extra
        )
        router = m.Qwen3MoeTopKRouter(config)
    elif family == "mixtral":
        from transformers.models.mixtral import configuration_mixtral as c
        from transformers.models.mixtral import modeling_mixtral as m

        config = c.MixtralConfig(
            hidden_size=hidden, num_local_experts=experts, num_experts_per_tok=top_k
        )
        router = m.MixtralTopKRouter(config)
    else:
        from transformers.models.deepseek_v3 import configuration_deepseek_v3 as c
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

        config = c.DeepseekV3Config(
            hidden_size=hidden, n_routed_experts=experts, num_experts_per_tok=top_k, **extra
        )
        router = m.DeepseekV3TopkRouter(config)
        with torch.no_grad():
            router.e_score_correction_bias.uniform_(-0.2, 0.2)
    with torch.no_grad():
        router.weight.normal_(0.0, 1.0)
    return router


HF_CASES = {
    "qwen3_moe_norm": ("qwen3_moe", 16, 4, dict(norm_topk_prob=True)),
    "qwen3_moe_no_norm": ("qwen3_moe", 8, 2, dict(norm_topk_prob=False)),
    "mixtral": ("mixtral", 8, 2, {}),
    "deepseek_v3": (
        "deepseek_v3",
        16,
        4,
        dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
    ),
}


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_routing_matches_hugging_face(name):
    import torch

    family, experts, top_k, extra = HF_CASES[name]
    torch.manual_seed(seed_of("hf_router", name) % 2**31)
    router = _hf_router(family, experts, top_k, hidden=32, **extra)
    hidden = torch.randn(21, 32)
    with torch.no_grad():
        logits, hf_weights, hf_ids = router(hidden)
    kwargs = dict(scoring="softmax", renormalize=extra.get("norm_topk_prob", True))
    if family == "deepseek_v3":
        kwargs = dict(
            scoring="sigmoid",
            renormalize=extra["norm_topk_prob"],
            correction_bias=jnp.asarray(router.e_score_correction_bias.numpy()),
            num_groups=extra["n_group"],
            topk_groups=extra["topk_group"],
            routed_scaling_factor=extra["routed_scaling_factor"],
        )
    weights, ids = routing.select_experts(jnp.asarray(logits.float().numpy()), top_k, **kwargs)
    assert_same_routing(weights, ids, hf_weights.float().numpy(), hf_ids.numpy(), tol=1e-5)


def test_reference_matches_hugging_face_qwen3_moe_block():
    """The spec (routing + reference experts) equals HF's whole sparse MoE block in float32."""
    import torch
    from transformers.models.qwen3_moe import configuration_qwen3_moe as c
    from transformers.models.qwen3_moe import modeling_qwen3_moe as m

    torch.manual_seed(seed_of("hf_block") % 2**31)
    config = c.Qwen3MoeConfig(
        hidden_size=32,
        moe_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        hidden_act="silu",
    )
    block = m.Qwen3MoeSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
        hidden = torch.randn(1, 19, 32)
        want = block(hidden)[0].numpy()
    x = jnp.asarray(hidden[0].numpy())
    logits = x @ jnp.asarray(block.gate.weight.detach().numpy()).T
    weights, ids = routing.select_experts(logits, 2, renormalize=True)
    got = reference.fused_moe(
        x,
        weights,
        ids,
        jnp.asarray(block.experts.gate_up_proj.detach().numpy()),
        jnp.asarray(block.experts.down_proj.detach().numpy()),
    )
    assert rel_err(got, jnp.asarray(want)) <= 1e-5


@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh"])
def test_activations_match_torch(activation):
    import torch
    from transformers.activations import ACT2FN

    g = np.linspace(-6.0, 6.0, 101, dtype=np.float32)
    want = ACT2FN[activation](torch.from_numpy(g)).numpy()
    np.testing.assert_allclose(reference.activate(jnp.asarray(g), activation), want, atol=2e-6)


# ---------------------------------------------------------------- implementations vs reference

# (tokens, hidden, inter, experts, top_k, load, dtype, activation)
FAST_CASES = [
    (13, 32, 24, 8, 2, "random", jnp.float32, "silu"),
    (3, 32, 16, 16, 1, "random", jnp.float32, "silu"),  # most experts get no token
    (21, 64, 32, 16, 8, "random", jnp.bfloat16, "silu"),
    (17, 32, 16, 4, 1, "one_expert", jnp.float32, "silu"),
    (10, 32, 16, 8, 2, "one_expert", jnp.bfloat16, "silu"),  # duplicate ids within a token
    (9, 32, 16, 8, 8, "first_k", jnp.float32, "gelu"),
    (30, 32, 16, 16, 2, "skewed", jnp.float32, "gelu_pytorch_tanh"),
    (11, 32, 16, 8, 2, "dropped", jnp.float32, "silu"),
]
SLOW_CASES = [
    (1, 64, 32, 16, 8, "random", jnp.bfloat16, "silu"),  # one decode token
    (77, 128, 64, 16, 2, "random", jnp.float32, "silu"),
    (64, 128, 256, 8, 2, "skewed", jnp.bfloat16, "silu"),
    (45, 256, 128, 16, 4, "first_k", jnp.float32, "gelu"),
    (33, 64, 32, 16, 1, "one_expert", jnp.bfloat16, "gelu_pytorch_tanh"),
    (50, 64, 48, 12, 3, "dropped", jnp.bfloat16, "silu"),
    (129, 64, 32, 8, 2, "random", jnp.float32, "silu"),
]


def _case_id(case):
    t, h, i, e, k, load, dtype, act = case
    return f"T{t}-H{h}-I{i}-E{e}-k{k}-{load}-{jnp.dtype(dtype).name}-{act}"


def _check(impl, case, **kwargs):
    t, h, i, e, k, load, dtype, act = case
    problem = make_problem(
        seed_of(impl.__name__, case),
        tokens=t,
        hidden=h,
        inter=i,
        experts=e,
        top_k=k,
        dtype=dtype,
        load=load,
    )
    want = reference.fused_moe(*problem.args(), activation=act)
    got = impl(*problem.args(), activation=act, **kwargs)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.all(np.isfinite(np.asarray(got.astype(jnp.float32))))
    err = rel_err(got, want)
    assert err <= tol_of(dtype), f"relative error {err:.3g}"


@pytest.mark.parametrize("case", FAST_CASES, ids=_case_id)
def test_xla_matches_reference(case):
    _check(xla.fused_moe, case)


@pytest.mark.parametrize(
    "case, kwargs",
    [
        # One tile per step (many loop steps) and explicit row tiles.
        (FAST_CASES[6], dict(gather_bytes=1, block_m=8)),
        (FAST_CASES[2], dict(block_m=16)),
        (FAST_CASES[0], dict(method="ragged_dot")),
        (FAST_CASES[7], dict(method="ragged_dot")),
    ],
    ids=["one_tile_per_step", "block_m16", "ragged_dot", "ragged_dot_dropped"],
)
def test_xla_options_match_reference(case, kwargs):
    _check(xla.fused_moe, case, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=_case_id)
@pytest.mark.parametrize("method", ["tiles", "ragged_dot"])
def test_xla_matches_reference_sweep(case, method):
    _check(xla.fused_moe, case, method=method, gather_bytes=1 << 16)


TPU_FAST = [FAST_CASES[i] for i in (0, 2, 3, 6, 7)]


@pytest.mark.parametrize("case", TPU_FAST, ids=_case_id)
def test_tpu_matches_reference(case):
    _check(tpu.fused_moe, case, block_m=16, interpret=INTERPRET)


def test_tpu_column_and_contraction_tiles():
    """Several n and k blocks per expert (gate/up halves at the right offsets, accumulation)."""
    _check(
        tpu.fused_moe,
        (19, 256, 256, 8, 2, "random", jnp.float32, "silu"),
        block_m=8,
        block_n=128,
        block_k=128,
        interpret=INTERPRET,
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES + FAST_CASES, ids=_case_id)
@pytest.mark.parametrize("block_m", [8, 32, None])
def test_tpu_matches_reference_sweep(case, block_m):
    if block_m == 8 and case[6] == jnp.bfloat16:
        block_m = 16
    _check(tpu.fused_moe, case, block_m=block_m, interpret=INTERPRET)


def test_routing_layout_groups_rows_by_expert():
    """Every used row tile holds rows of its own expert only; empty experts get no tile."""
    block_m, experts = 8, 16
    ids = jnp.asarray(np.r_[[3] * 10, [7] * 3, [3] * 5, [15] * 1, [-1, 16]].reshape(-1, 1))
    row_token, assignment_row, tile_expert, num_used = xla.routing_layout(ids, experts, block_m)
    flat = np.asarray(ids).reshape(-1)
    n_used = int(num_used[0])
    # Expert 3: 15 rows -> 2 tiles; expert 7: 1 tile; expert 15: 1 tile.
    assert n_used == 4
    np.testing.assert_array_equal(np.asarray(tile_expert)[:n_used], [3, 3, 7, 15])
    rows = np.asarray(assignment_row)
    assert rows[-1] == rows[-2] == row_token.shape[0]  # dropped ids have no row
    for a, row in enumerate(rows[:-2]):
        assert int(tile_expert[row // block_m]) == flat[a]
        assert int(row_token[row]) == a  # top_k == 1: assignment a is token a
    real = set(rows[:-2].tolist())
    pads = [r for r in range(n_used * block_m) if r not in real]
    assert all(int(row_token[r]) == ids.shape[0] for r in pads)


def test_xla_compiles_once_per_shape():
    """Routing changes never retrace: all shapes are static."""
    case = dict(tokens=12, hidden=32, inter=16, experts=8, top_k=2)
    before = None
    for i, load in enumerate(("random", "one_expert", "skewed")):
        problem = make_problem(seed_of("retrace", i), load=load, **case)
        xla.fused_moe(*problem.args())
        before = before if before is not None else xla.fused_moe._cache_size()
    assert xla.fused_moe._cache_size() == before


def test_tpu_kernel_lowers_for_tpu():
    """The real Mosaic lowering (not interpret mode) accepts the kernels' blocks."""
    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device
    )
    # A Qwen3-30B-A3B-sized layer: 128 experts, top 8, H 2048, I 768.
    t, h, i, e, k, dtype = 64, 2048, 768, 128, 8, jnp.bfloat16
    args = (
        jax.ShapeDtypeStruct((t, h), dtype),
        jax.ShapeDtypeStruct((t, k), jnp.float32),
        jax.ShapeDtypeStruct((t, k), jnp.int32),
        jax.ShapeDtypeStruct((e, 2 * i, h), dtype),
        jax.ShapeDtypeStruct((e, h, i), dtype),
    )
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(tpu.fused_moe).trace(*args).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 2


@pytest.mark.parametrize("impl", [reference.fused_moe, xla.fused_moe, tpu.fused_moe])
def test_rejects_bad_shapes_and_activation(impl):
    p = make_problem(seed_of("bad"), tokens=4, hidden=32, inter=16, experts=4, top_k=2)
    with pytest.raises(ValueError, match="activation"):
        impl(*p.args(), activation="relu")
    with pytest.raises(ValueError, match="w_down"):
        impl(p.x, p.weights, p.expert_ids, p.w_gate_up, p.w_down[:, :, :8])


def test_tpu_rejects_unaligned_intermediate():
    p = make_problem(seed_of("unaligned"), tokens=4, hidden=32, inter=12, experts=4, top_k=2)
    with pytest.raises(ValueError, match="multiple of 8"):
        tpu.fused_moe(*p.args(), interpret=True)


def test_xla_rejects_unknown_method():
    p = make_problem(seed_of("method"), tokens=4, hidden=32, inter=16, experts=4, top_k=2)
    with pytest.raises(ValueError, match="method"):
        xla.fused_moe(*p.args(), method="dense")
