"""When the plugin takes over vLLM, and when it stays out of the way."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tpu_plugin import PLATFORM_CLASS, detect_platform, take_device_flag

VENV_BIN = os.path.dirname(sys.executable)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_PLUGIN_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "argv, value, rest",
    [
        (["vllm", "serve", "m", "--device", "cpu"], "cpu", ["vllm", "serve", "m"]),
        (["vllm", "serve", "--device=tpu", "m"], "tpu", ["vllm", "serve", "m"]),
        (["vllm", "serve", "m"], None, ["vllm", "serve", "m"]),
    ],
)
def test_device_flag_is_taken_from_argv(argv, value, rest):
    argv = list(argv)
    assert take_device_flag(argv) == value
    assert argv == rest


def test_env_var_activates(monkeypatch):
    monkeypatch.setenv("TPU_PLUGIN_DEVICE", "cpu")
    assert detect_platform() == PLATFORM_CLASS


def test_no_opt_in_and_no_tpu_stays_silent(monkeypatch):
    monkeypatch.delenv("TPU_PLUGIN_DEVICE", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert detect_platform() is None


def test_libtpu_without_tpu_chips_is_not_a_tpu_host(monkeypatch):
    """The CPU test target installs libtpu (the TPU compiler, tests/tpu): no chips, no TPU."""
    import importlib.util

    monkeypatch.delenv("TPU_PLUGIN_DEVICE", raising=False)
    assert importlib.util.find_spec("libtpu") is not None
    monkeypatch.setattr("glob.glob", lambda pattern: [])
    assert detect_platform() is None
    monkeypatch.setattr("glob.glob", lambda pattern: ["/dev/vfio/0"] if "vfio" in pattern else [])
    assert detect_platform() == PLATFORM_CLASS  # libtpu and chips: a TPU host
    assert os.environ.pop("TPU_PLUGIN_DEVICE") == "tpu"


def test_cpu_run_with_libtpu_installed_never_opens_a_tpu_backend():
    """--device cpu with libtpu installed: JAX's backend is the CPU and libtpu never starts
    (it would print that it finds no TPU host bounds or worker addresses)."""
    code = (
        "from tpu_plugin import detect_platform; detect_platform()\n"
        "from tpu_plugin.worker import select_jax_backend\n"
        "import jax; print(select_jax_backend(), jax.default_backend(), len(jax.devices()))"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "TPU_PLUGIN_DEVICE": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cpu", "cpu", "1"]
    for sign in ("TPU_WORKER_HOSTNAMES", "host bounds", "libtpu"):
        assert sign not in result.stderr


def test_cuda_looking_host_keeps_stock_vllm_unless_opted_in(monkeypatch):
    """With the CUDA probe answering yes, vLLM resolves to CUDA unless the user opts in."""
    import vllm.platforms as platforms

    cuda = "vllm.platforms.cuda.CudaPlatform"
    monkeypatch.setitem(platforms.builtin_platform_plugins, "cuda", lambda: cuda)
    # A CUDA host has no libtpu; vLLM's own TPU probe takes an installed libtpu for a TPU
    # host (the test requirements install it for tests/tpu).
    monkeypatch.setitem(platforms.builtin_platform_plugins, "tpu", lambda: None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    monkeypatch.delenv("TPU_PLUGIN_DEVICE", raising=False)
    assert platforms.resolve_current_platform_cls_qualname() == cuda
    monkeypatch.setenv("TPU_PLUGIN_DEVICE", "gpu")
    assert platforms.resolve_current_platform_cls_qualname() == PLATFORM_CLASS


def test_vllm_resolves_the_plugin_platform():
    result = run_python(
        "from vllm.platforms import current_platform as p; print(type(p).__name__, p.device_name)",
        TPU_PLUGIN_DEVICE="cpu",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["TpuPluginPlatform", "cpu"]


def test_bad_env_value_fails_with_the_valid_choices():
    result = run_python("from vllm.platforms import current_platform", TPU_PLUGIN_DEVICE="abc")
    assert result.returncode != 0
    assert "TPU_PLUGIN_DEVICE='abc' is not valid; choose one of: tpu, cpu, gpu" in result.stderr


def test_bad_cli_value_fails_with_the_valid_choices():
    result = subprocess.run(
        [os.path.join(VENV_BIN, "vllm"), "serve", "some-model", "--device", "quantum"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("TPU_PLUGIN_")},
    )
    assert result.returncode != 0
    assert "choose one of: tpu, cpu, gpu" in result.stderr


def test_device_flag_is_documented_in_serve_help():
    result = subprocess.run(
        [os.path.join(VENV_BIN, "vllm"), "serve", "--help=all"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TPU_PLUGIN_DEVICE": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    assert "--device" in result.stdout
