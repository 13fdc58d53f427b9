"""Async scheduling: step N+1 is prepared and dispatched before step N's tokens reach the host.

With ``--async-scheduling`` vLLM's engine schedules step N+1 right after dispatching step N and
reads step N's output only afterwards. The runner therefore never waits for a step's tokens:

* ``sample_tokens`` dispatches the sampler, writes the sampled ids into ``last_tokens`` (one
  device entry per batch slot, :func:`record_tokens`), starts their copy to the host and
  returns an :class:`AsyncStepOutput`; the host bookkeeping runs when it is resolved.
* ``execute_model`` for step N+1 leaves a placeholder where a request's step-N token goes and
  lists it in ``StepInputs.merge_dst``/``merge_src``; the jitted forward reads the token from
  ``last_tokens`` on the device (``inputs.merge_prev_tokens``), so host input preparation of
  N+1 overlaps the device's compute of N.
* Step N is resolved before step N+1's sampling inputs are built (penalties, seeds and bad
  words read the token history), by then the device has N+1's forward queued behind it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput


@jax.jit
def record_tokens(last_tokens: jax.Array, slots: jax.Array, tokens: jax.Array) -> jax.Array:
    """``last_tokens[slots[i]] = tokens[i]``; padding rows carry an out-of-range slot."""
    return last_tokens.at[slots].set(tokens[: slots.shape[0]], mode="drop")


class AsyncStepOutput(AsyncModelRunnerOutput):
    """A step's output whose host copy and bookkeeping run on first request (once)."""

    def __init__(self, finish: Callable[[], ModelRunnerOutput]):
        self._finish: Callable[[], ModelRunnerOutput] | None = finish
        self._output: ModelRunnerOutput | None = None

    @property
    def resolved(self) -> bool:
        return self._finish is None

    def get_output(self) -> ModelRunnerOutput:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            self._output = finish()
        assert self._output is not None
        return self._output


def start_host_copy(tree: object) -> None:
    """Starts the device-to-host copy of every array in ``tree`` without waiting for it."""
    for leaf in jax.tree_util.tree_leaves(tree):
        leaf.copy_to_host_async()
