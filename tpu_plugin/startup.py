"""Start-up failures as one sentence naming the fix, instead of a wall of tracebacks.

vLLM prints a traceback for every exception that ends a process: the API server's
(configuration errors come wrapped in a pydantic ``ValidationError``) and, for errors in the
engine process, the engine's own traceback followed by the front-end's "Engine core
initialization failed". A user who asked for a model that cannot run needs the reason and
the fix, not the stack. Two pieces do that:

- :func:`engine_startup_errors` turns the plugin's own start-up errors raised in a spawned
  engine process into ``SystemExit(message)``: Python's multiprocessing prints just the
  message and the process exits 1 (vLLM logs no traceback for ``SystemExit``).
- :func:`install_cli_excepthook` (called in the ``vllm`` console script only) prints
  configuration errors and the engine's start-up failure as one line each and exits 1.
  Every other exception keeps Python's default report.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
from collections.abc import Iterator
from types import TracebackType
from typing import Any

_ENGINE_FAILED = "Engine core initialization failed"


class StartupError(ValueError):
    """A configuration the plugin cannot run; the message is one sentence naming the fix."""


def _plugin_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is a complete, user-facing sentence."""
    from tpu_plugin.models.loader import CheckpointError
    from tpu_plugin.models.quantization import QuantizationError
    from tpu_plugin.models.registry import UnsupportedModelError

    return (StartupError, CheckpointError, QuantizationError, UnsupportedModelError)


@contextlib.contextmanager
def engine_startup_errors() -> Iterator[None]:
    """In a spawned engine process, ends start-up errors as ``SystemExit`` (message only).

    In the caller's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, unit tests) the error
    is raised unchanged, so a library user can catch it.
    """
    try:
        yield
    except _plugin_errors() as error:
        if multiprocessing.parent_process() is None:
            raise
        raise SystemExit(f"tpu-plugin: {error}") from None


def _config_error_messages(error: BaseException) -> list[str] | None:
    """The messages inside a pydantic ``ValidationError`` of vLLM's config (else None)."""
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - vLLM depends on pydantic
        return None
    if not isinstance(error, ValidationError):
        return None
    messages = []
    for item in error.errors():
        cause = (item.get("ctx") or {}).get("error")
        messages.append(str(cause) if cause is not None else str(item.get("msg", "")))
    return messages or None


def _cli_excepthook(
    exc_type: type[BaseException], error: BaseException, tb: TracebackType | None
) -> None:
    messages = _config_error_messages(error)
    if messages is None and isinstance(error, _plugin_errors()):
        messages = [str(error)]
    if messages is not None:
        for message in messages:
            sys.stderr.write(f"vllm: error: {message}\n")
        sys.stderr.flush()
        return
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C, or SIGTERM during start-up (vLLM's)
        sys.stderr.write("vllm: stopped\n")
        sys.stderr.flush()
        return
    if isinstance(error, RuntimeError) and str(error).startswith(_ENGINE_FAILED):
        sys.stderr.write(
            "vllm: error: the engine stopped during start-up; its reason is printed above\n"
        )
        sys.stderr.flush()
        return
    sys.__excepthook__(exc_type, error, tb)


def install_cli_excepthook() -> None:
    """Replaces ``sys.excepthook`` in the ``vllm`` CLI process (exit status stays 1)."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _cli_excepthook


_forwarding = False


def _is_engine(process: Any) -> bool:
    """Not multiprocessing's resource tracker (it ignores SIGTERM and outlives the engines)."""
    try:
        return "resource_tracker" not in " ".join(process.cmdline())
    except Exception:  # gone already, or not ours to read
        return False


def forward_sigterm_to_starting_engines() -> None:
    """Makes SIGTERM to a starting ``vllm serve`` stop its engine process within seconds.

    vLLM's API server waits for its engine's READY message in one zmq poll of the main
    thread, for up to ``VLLM_ENGINE_READY_TIMEOUT_S``. The kernel delivers a SIGTERM to any
    thread that does not block it (native threads of torch and JAX do not), so the poll is
    not interrupted and vLLM's handler (which would shut the engine down) runs only when the
    poll returns: after the whole start-up, precompilation included. Here a thread of ours
    reads the byte Python's C-level handler writes to the wakeup fd for every signal and
    sends SIGTERM to this process's children; a starting engine stops at once
    (runner/precompile.py); then the signal goes again to the main thread itself, which
    interrupts the poll so that vLLM's handler runs and the API server exits. The previous
    wakeup fd (the event loop's) gets every byte too. Called from the platform in the API
    server's main thread; uvicorn's own signal set-up replaces the wakeup fd once the server
    runs, so a running server's shutdown is vLLM's own.
    """
    global _forwarding
    import os
    import signal
    import threading

    if _forwarding or threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _forwarding = True

    main_thread = threading.main_thread().ident

    def forward() -> None:
        import psutil

        while data := os.read(read_fd, 64):
            if previous >= 0:
                with contextlib.suppress(OSError):
                    os.write(previous, data)
            if signal.SIGTERM not in data:
                continue
            engines = [p for p in psutil.Process().children(recursive=True) if _is_engine(p)]
            for engine in engines:
                with contextlib.suppress(psutil.Error):
                    engine.send_signal(signal.SIGTERM)
            psutil.wait_procs(engines, timeout=10)
            # The main thread's poll waits for a READY that will not come: the signal again,
            # to that thread, interrupts it so vLLM's handler runs (and this thread stops).
            signal.pthread_kill(main_thread, signal.SIGTERM)
            return

    threading.Thread(target=forward, name="tpu-plugin-sigterm", daemon=True).start()
