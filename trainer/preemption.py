"""A preemption notice (SIGTERM) for the train loop, which then checkpoints
and returns. Over several processes JAX's preemption service agrees on the
step at which they all stop."""

from __future__ import annotations

import signal

import jax


class Preemption:

  def __init__(self):
    self._requested = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._note)

  def _note(self, signum, frame):
    self._requested = True

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (every process gets the same answer)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
