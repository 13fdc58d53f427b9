"""``vllm serve`` start-up errors end with one sentence naming the fix, and no traceback.

Each case runs the real console script until it exits by itself: configuration errors stop
in the API server process (``check_and_update_config``, detection), checkpoint and KV-cache
errors in the engine process (``tpu_plugin.startup`` turns both into one line each).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file
from transformers import LlamaConfig, MambaConfig

from tests.conftest import SMALL, make_random_checkpoint
from tests.e2e.server import serve_until_exit

SMALL_ARGS = ("--skip-tokenizer-init", "--max-model-len", "256")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt", LlamaConfig(**SMALL))


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_one_sentence(result, *fragments: str) -> str:
    """Non-zero exit, no traceback, and a single line that carries every fragment."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if all(f in line for f in fragments)]
    assert len(lines) == 1, (fragments, output[-3000:])
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(("vllm: error:", "tpu-plugin:")), last
    return lines[0]


def test_unsupported_architecture(tmp_path):
    config = MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=128, state_size=4)
    config.architectures = ["MambaForCausalLM"]
    config.save_pretrained(tmp_path / "mamba")  # the front end stops before reading weights
    result = serve_until_exit(tmp_path / "mamba", *SMALL_ARGS)
    line = assert_one_sentence(result, "MambaForCausalLM", "use a supported architecture")
    assert "LlamaForCausalLM" in line  # names what is supported


def test_kv_cache_smaller_than_one_sequence(llama_dir):
    result = serve_until_exit(llama_dir, *SMALL_ARGS, "--kv-cache-memory-bytes", "20000")
    assert_one_sentence(
        result, "holds 16 tokens, less than one --max-model-len 256", "--kv-cache-memory-bytes"
    )


def test_checkpoint_missing_a_tensor(llama_dir, tmp_path):
    broken = copy_checkpoint(llama_dir, tmp_path / "missing")
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = serve_until_exit(broken, *SMALL_ARGS, "--kv-cache-memory-bytes", str(2**24))
    assert_one_sentence(result, "lacks 1 tensor(s): model.layers.1.mlp.down_proj.weight")


@pytest.mark.slow  # same engine-side path as the missing tensor (17 s each)
def test_checkpoint_with_a_misshaped_tensor(llama_dir, tmp_path):
    broken = copy_checkpoint(llama_dir, tmp_path / "misshaped")
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96  # the weights were saved with 128
    (broken / "config.json").write_text(json.dumps(config))
    result = serve_until_exit(broken, *SMALL_ARGS, "--kv-cache-memory-bytes", str(2**24))
    assert_one_sentence(result, "has shape (64, 128) in the checkpoint", "expects (64, 96)")


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here"
)
def test_device_tpu_without_a_tpu(llama_dir):
    result = serve_until_exit(llama_dir, "--device", "tpu", *SMALL_ARGS)
    assert_one_sentence(result, "no TPU found", "use --device cpu or --device gpu")


def test_trust_remote_code_stays_off(llama_dir, tmp_path):
    """A checkpoint with custom code is refused unless asked; its code never runs."""
    remote = copy_checkpoint(llama_dir, tmp_path / "remote")
    marker = tmp_path / "custom-code-ran"
    (remote / "configuration_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom'\n"
    )
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (remote / "config.json").write_text(json.dumps(config))
    result = serve_until_exit(remote, *SMALL_ARGS)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert "trust_remote_code=True" in result.stderr
    assert not marker.exists()


def test_in_process_engines_keep_the_exception():
    """Without an engine subprocess (library use, unit tests) the error stays catchable."""
    from tpu_plugin.startup import StartupError, engine_startup_errors

    with pytest.raises(StartupError, match="the fix"), engine_startup_errors():
        raise StartupError("one sentence naming the fix")
