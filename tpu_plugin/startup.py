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

_ENGINE_FAILED = "Engine core initialization failed"


class StartupError(ValueError):
    """A configuration the plugin cannot run; the message is one sentence naming the fix."""


def _plugin_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is a complete, user-facing sentence."""
    from tpu_plugin.models.loader import CheckpointError
    from tpu_plugin.models.registry import UnsupportedModelError

    return (StartupError, CheckpointError, UnsupportedModelError)


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
