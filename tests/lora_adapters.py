"""LoRA adapters made by Hugging Face PEFT on the tests' random bases, and PEFT's own outputs.

PEFT initialises B to zero (an adapter that changes nothing); these adapters draw every A and
B entry at random instead, large enough that each adapter changes the greedy tokens, so a
wrong slot, a missed projection or a wrong scaling cannot pass unnoticed.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import torch_greedy, torch_last_logits

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (rank, targets, extra LoraConfig fields) of the adapters the parity tests serve together:
# different ranks (all padded to the engine's max rank), subsets of the projections, an
# alpha != rank, rsLoRA scaling and a per-module rank/alpha pattern.
ADAPTERS = [
    (8, ALL_TARGETS, {}),
    (4, ["q_proj", "v_proj"], {"lora_alpha": 16}),
    (2, ["o_proj", "down_proj", "up_proj"], {"use_rslora": True}),
    (
        6,
        ["k_proj", "gate_proj"],
        {"rank_pattern": {"gate_proj": 3}, "alpha_pattern": {"k_proj": 2}},
    ),
]


def make_adapter(
    out_dir: Path,
    base_dir: Path,
    rank: int,
    targets: list[str],
    seed: int,
    scale: float = 0.3,
    **config,
) -> Path:
    """Saves a PEFT LoRA adapter of ``base_dir`` to ``out_dir``: A and B entries drawn from
    N(0, ``scale``^2), so that the adapter changes the greedy tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config.setdefault("lora_alpha", 2 * rank)
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, target_modules=targets, init_lora_weights=False, **config)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * scale)
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_adapters(tmp_path: Path, base_dir: Path, specs=ADAPTERS) -> list[Path]:
    return [
        make_adapter(tmp_path / f"adapter{i}", base_dir, rank, targets, seed=100 + i, **extra)
        for i, (rank, targets, extra) in enumerate(specs)
    ]


def _model(base_dir: Path, adapter: Path | None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter) if adapter is not None else model


def peft_greedy(
    base_dir: Path, adapter: Path | None, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """HF + PEFT (fp32) greedy continuations of ``prompts`` with ``adapter`` (None: base)."""
    return torch_greedy(_model(base_dir, adapter), prompts, max_new_tokens)


def peft_last_logits(base_dir: Path, adapter: Path | None, prompts: list[list[int]]):
    """HF + PEFT fp32 logits at each prompt's last position, ``[prompts, vocab]``."""
    return torch_last_logits(_model(base_dir, adapter), prompts)


def expected_greedy(
    base_dir: Path,
    adapters: list[Path],
    prompts: list[list[int]],
    choice: list[int],
    max_new_tokens: int,
) -> list[list[int]]:
    """HF + PEFT greedy tokens of prompt ``i`` with adapter ``choice[i]`` (-1: the base)."""
    out: list[list[int] | None] = [None] * len(prompts)
    for which in sorted(set(choice)):
        rows = [i for i, c in enumerate(choice) if c == which]
        adapter = adapters[which] if which >= 0 else None
        tokens_of_rows = peft_greedy(base_dir, adapter, [prompts[i] for i in rows], max_new_tokens)
        for i, tokens in zip(rows, tokens_of_rows, strict=True):
            out[i] = tokens
    return out  # type: ignore[return-value]
