"""Builds ``.whl/``: the wheels the lent GPU machine lacks to run vLLM + the plugin.

The device has Python 3.12, torch 2.11, jax 0.11.2 (CUDA 13), flax and transformers, but no
registry access. This walks the requirement closure of the venv's vLLM build and torchax,
drops what the device image already holds (its package list, from the device tool's KINDS.md),
downloads the rest as cp312 manylinux wheels, and adds the cached vLLM ``empty`` wheel and a
wheel of this plugin. Run from the repository root after ``scripts/install.sh``:

    .venv/bin/python scripts/device_wheels.py      # then carry ".whl" in the device call

On the device: ``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl``
and ``export PYTHONPATH=/tmp/site`` (see benchmarks/README.md).
"""

from __future__ import annotations

import glob
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys

ON_DEVICE = set(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
    psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
    torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
    treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
    werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_on_device(roots: list[str]) -> list[str]:
    """``name==version`` for every package in the roots' closure the device lacks."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = normalize(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = dist.version
        for requirement in dist.requires or []:
            if "extra ==" not in requirement:
                todo.append(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))
    return [f"{n}=={v}" for n, v in sorted(seen.items()) if n not in ON_DEVICE]


def main() -> None:
    out = ".whl"
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    wanted = [r for r in missing_on_device(["vllm-tpu", "torchax"]) if not r.startswith("vllm-")]
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.check_call(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platform_args,
            "-d",
            out,
            *wanted,
        ]
    )
    home = os.environ.get("TPU_PLUGIN_HOME", os.path.expanduser("~/.cache/tpu-plugin"))
    vllm_wheels = glob.glob(os.path.join(home, "wheels", "vllm_tpu-0.32.0+empty-*.whl"))
    if not vllm_wheels:
        raise SystemExit("no vLLM empty wheel cached; run scripts/install.sh first")
    shutil.copy(vllm_wheels[0], out)
    subprocess.check_call(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            out,
            ".",
        ]
    )
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, "*.whl")))
    print(f"{len(os.listdir(out))} wheels, {size / 2**20:.1f} MiB in {out}/")


if __name__ == "__main__":
    main()
