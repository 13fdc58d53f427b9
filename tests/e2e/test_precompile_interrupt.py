"""A server still precompiling stops on SIGTERM or Ctrl-C within seconds and leaves only whole
executable-cache entries behind (tpu_plugin/runner/precompile.py).

SmolLM2's 30-layer step programs take seconds each to compile on 2 cores, so the signal lands
while XLA is compiling one of them: the case where the engine used to log the signal and go on
compiling for minutes.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.server import free_port, serve_command, serve_env
from tpu_plugin.runner.executable_cache import SUBDIR, remove_orphaned_temporaries

STOP_WITHIN_S = 20  # the process group gone, from the signal (2 shared cores)


def group_alive(proc: subprocess.Popen) -> bool:
    """Any process of the server's group still running (exited ones reaped or zombies)."""
    proc.poll()  # reaps the API server once it exits
    for other in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error):
            if os.getpgid(other.pid) == proc.pid and other.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


# ctrl-c-to-group is slow (31 s): the SIGTERM case exercises the same stop path by default
@pytest.mark.parametrize(
    "how", ["sigterm-to-server", pytest.param("ctrl-c-to-group", marks=pytest.mark.slow)]
)
def test_starting_server_stops_promptly(smollm2_dir, tmp_path, how):
    cache = tmp_path / "cache"
    entries = cache / SUBDIR
    env = serve_env() | {"TPU_PLUGIN_PRECOMPILE": "1", "TPU_PLUGIN_COMPILE_CACHE": str(cache)}
    args = ("--max-model-len", "512", "--kv-cache-memory-bytes", str(64 * 2**20))
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        serve_command(smollm2_dir, *args, port=free_port()),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not list(entries.glob("*.jaxexe")):  # precompiling: the first program stored
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "precompilation did not start"
            time.sleep(0.5)
        sent = time.monotonic()
        if how == "sigterm-to-server":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        while group_alive(proc) and time.monotonic() - sent < STOP_WITHIN_S + 60:
            time.sleep(0.2)
        stopped_after = time.monotonic() - sent
    finally:
        if group_alive(proc):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    print(f"{how}: stopped {stopped_after:.1f} s after the signal")
    assert "precompilation stopped by" in text, text[-3000:]
    assert stopped_after <= STOP_WITHIN_S, text[-3000:]
    assert not list(entries.glob(".tmp-*")), "a half-written entry was left behind"
    stored = list(entries.glob("*.jaxexe"))
    assert stored
    for path in stored:  # every entry whole: it unpickles and holds its own key
        with open(path, "rb") as f:
            assert pickle.load(f)["key"] == path.stem


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    """A writer killed mid-write (SIGKILL) leaves ``.tmp-<pid>-…``; the next cache removes it,
    but never a live process's file."""
    dead = _a_dead_pid()
    orphan = tmp_path / f".tmp-{dead}-abc.jaxexe"
    live = tmp_path / f".tmp-{os.getpid()}-def.jaxexe"
    orphan.write_bytes(b"half")
    live.write_bytes(b"in progress")
    assert remove_orphaned_temporaries(Path(tmp_path)) == 1
    assert not orphan.exists() and live.exists()


def _a_dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
