"""Starting ``vllm serve --device cpu`` from tests and scripts, and reading its ``/metrics``.

One place for the command line, the readiness wait, the log file and the clean-up, shared by
the serving tests (``conftest.py``'s ``smollm2_server``), the start-up error tests and
``benchmarks/load_test.py``. Every server listens on loopback only.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

VLLM = os.path.join(os.path.dirname(sys.executable), "vllm")
API_KEY = "tpu-plugin-test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_env() -> dict[str, str]:
    """The environment for a ``vllm serve`` child: ``--device`` alone picks the backend."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TPU_PLUGIN_DEVICE")}


def serve_command(model: str | Path, *args: str, port: int | None = None) -> list[str]:
    command = [VLLM, "serve", str(model), "--device", "cpu", "--host", "127.0.0.1"]
    if port is not None:
        command += ["--port", str(port)]
    return command + list(args)


@dataclass
class Server:
    """A running server: ``base`` is ``http://127.0.0.1:<port>``; ``log`` its output file."""

    base: str
    api_key: str | None
    log: Path
    process: subprocess.Popen

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics(self) -> dict[str, float]:
        """``/metrics`` samples without labels, summed over label sets (one engine here).

        Also ``num_gpu_blocks``: the KV cache size, a label of ``vllm:cache_config_info``.
        """
        text = requests.get(self.base + "/metrics", timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(value)
            if name == "vllm:cache_config_info" and (
                blocks := re.search(r'num_gpu_blocks="(\d+)"', name_labels)
            ):
                values["num_gpu_blocks"] = float(blocks.group(1))
        return values


@contextlib.contextmanager
def vllm_server(
    model: str | Path,
    *args: str,
    api_key: str | None = None,
    startup_timeout: float = 300,
) -> Iterator[Server]:
    """Runs ``vllm serve <model> --device cpu <args>`` until the block ends (then stops it)."""
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"vllm-serve-{port}.log"
    extra = ["--api-key", api_key] if api_key else []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            serve_command(model, *args, *extra, port=port),
            env=serve_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the engine process goes with it
        )
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(proc, base, log_path, startup_timeout)
            yield Server(base=base, api_key=api_key, log=log_path, process=proc)
        finally:
            stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's group, SIGKILL after 60 s.

    Terminating only the API server can leave an engine process that is still starting (it
    defers signals until it is built) running as an orphan.
    """
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the API server is gone; give its engine process the same time, then kill it
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)
                time.sleep(0.5)
        except ProcessLookupError:
            return


def _wait_ready(proc: subprocess.Popen, base: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise TimeoutError(f"vllm serve not ready in {timeout:.0f} s; see {log}")


def serve_until_exit(
    model: str | Path, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Runs a ``vllm serve`` that is expected to stop by itself (a start-up error)."""
    command = serve_command(model, *args, port=free_port())
    proc = subprocess.Popen(
        command,
        env=serve_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc)
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
