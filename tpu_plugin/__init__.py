"""tpu-plugin: a vLLM platform plugin that runs models on TPU (and CPU/GPU) through JAX.

vLLM calls :func:`detect_platform` (entry point ``vllm.platform_plugins``) in every process,
before it parses its command line.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

PLATFORM_CLASS = "tpu_plugin.platform.TpuPluginPlatform"
_DEVICE_FLAG = "--device"


def _is_vllm_cli() -> bool:
    """True in the ``vllm`` console script (only there is ``--device`` ours to take)."""
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    return program == "vllm" or sys.argv[0].endswith(os.path.join("cli", "main.py"))


def take_device_flag(argv: list[str]) -> str | None:
    """Removes ``--device X`` / ``--device=X`` from ``argv`` (in place) and returns X.

    vLLM 0.10 dropped ``--device`` from its CLI; the plugin restores it by turning it into
    ``TPU_PLUGIN_DEVICE`` before vLLM's parser runs, which every engine process inherits.
    """
    value = None
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == _DEVICE_FLAG:
            if i + 1 >= len(argv):
                raise SystemExit("vllm: --device needs a value: tpu, cpu or gpu")
            value = argv[i + 1]
            del argv[i : i + 2]
        elif arg.startswith(_DEVICE_FLAG + "="):
            value = arg.split("=", 1)[1]
            del argv[i]
        else:
            i += 1
    return value


def _missing_tpu() -> str | None:
    """Why this host cannot run ``--device tpu`` (None when it looks like a TPU host).

    Checked without starting JAX (detection runs in every vLLM process, and a JAX backend
    opened in the API server would hold the TPU the engine needs): libtpu must be installed
    and the TPU chips visible as ``/dev/accel*`` (v2-v4, v5p) or ``/dev/vfio/<n>`` (v5e, v6e).
    """
    if importlib.util.find_spec("libtpu") is None:
        return "libtpu is not installed"
    if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
        return "no TPU chips under /dev/accel* or /dev/vfio"
    return None


def detect_platform() -> str | None:
    """Returns the platform class path when the plugin should run, else None (stock vLLM).

    Activates for ``--device tpu|cpu|gpu`` or ``TPU_PLUGIN_DEVICE``, or on a TPU host (libtpu
    installed and TPU chips visible, :func:`_missing_tpu`). A CUDA or plain host without an
    opt-in returns None, libtpu or not.
    """
    from tpu_plugin import envs

    if _is_vllm_cli():
        from tpu_plugin.startup import install_cli_excepthook

        install_cli_excepthook()
        flag = take_device_flag(sys.argv)
        if flag is not None:
            os.environ["TPU_PLUGIN_DEVICE"] = flag.strip().lower()
    try:
        device = envs.device()
    except ValueError as error:
        # vLLM swallows exceptions raised during detection; exit so the user sees why.
        raise SystemExit(f"tpu-plugin: {error}") from None
    if device == "tpu" and (missing := _missing_tpu()) is not None:
        raise SystemExit(f"tpu-plugin: no TPU found ({missing}); use --device cpu or --device gpu")
    # A TPU host: libtpu *and* chips. libtpu alone is not one: the CPU test target installs it
    # to compile for TPU topologies ahead of time (tpu_plugin.tools.plan).
    if device is None and _missing_tpu() is None:
        device = "tpu"
        os.environ["TPU_PLUGIN_DEVICE"] = device
    return PLATFORM_CLASS if device is not None else None
