"""A multi-process run stops when one of its processes dies.

Left alone, the others wait in their next collective until JAX's coordination
service misses the dead one's heartbeats (100 s by default) and aborts them
with a fatal error's stack trace, while their worker processes live on.

Here each process renews a beat in JAX's key-value store (held by process 0's
coordination service) every few seconds and watches the next process's
(i + 1 mod n), so each process is watched by one other. A beat not renewed
for `timeout` seconds, or a process that failed, is posted as the run's
verdict, which every process reads with its own beat; each then prints one
line and exits with EXIT_CODE, and its workers go with it. A process that
cannot reach the store for `timeout` seconds (process 0, which holds it, is
gone) stops in the same way. JAX's own heartbeat timeout is set above this
bound, so that its abort never comes first.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Callable

EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure; running again resumes
KEY = "capjax/peers"
RESUME = "run the same command to resume"  # until the training loop says its checkpoint


def jax_heartbeat(timeout: float) -> int:
  """JAX's heartbeat timeout for a watch of `timeout` seconds: above it."""
  return int(max(100, 2 * timeout + 30))


class PeerWatch:

  def __init__(self, client, index: int, count: int, timeout: float, coordinator: str):
    self._client, self.index, self.count = client, index, count
    self.timeout, self.coordinator = timeout, coordinator
    self.interval = max(0.2, min(5.0, timeout / 6))
    self.watched = (index + 1) % count
    self.resume_hint: Callable[[], str] = lambda: RESUME
    self._stop = threading.Event()
    now = time.monotonic()
    self._heard, self._reached, self._last_beat = now, now, None
    self._left = False
    self._verdict: str | None = None

  def start(self) -> "PeerWatch":
    for target, name in ((self._beat, "peer-beat"), (self._judge, "peer-judge")):
      threading.Thread(target=target, name=name, daemon=True).start()
    atexit.register(self.finish)
    return self

  def _beat(self) -> None:
    """Renews this process's beat, reads the watched one's and the verdicts."""
    beat = 0
    while not self._stop.is_set():
      beat += 1
      try:
        self._client.key_value_set(f"{KEY}/beat/{self.index}/n", str(beat),
                                   allow_overwrite=True)
        seen = self._client.key_value_dir_get(f"{KEY}/beat/{self.watched}/")
        verdicts = self._client.key_value_dir_get(f"{KEY}/verdict/")
      except Exception:  # the store is gone or slow: the judge counts the time
        self._stop.wait(self.interval)
        continue
      now = time.monotonic()
      self._reached = now
      if seen and seen[0][1] != self._last_beat:
        self._last_beat, self._heard = seen[0][1], now
        self._left = seen[0][1] == "left"
      if verdicts and self._verdict is None:
        self._verdict = sorted(verdicts)[0][1]  # "dead|..." or "failed|..."
      self._stop.wait(self.interval)

  def _judge(self) -> None:
    while not self._stop.wait(0.25):
      now = time.monotonic()
      if self._verdict is not None:
        kind, _, reason = self._verdict.partition("|")
        self._exit(reason, resumable=kind == "dead")
      if not self._left and now - self._heard > self.timeout:
        reason = (f"process {self.watched} of {self.count} has not been heard from "
                  f"for {now - self._heard:.0f} s (--peer-timeout {self.timeout:g})")
        self._post("dead|" + reason)
        self._exit(reason)
      if now - self._reached > self.timeout:
        self._exit(f"the run's coordinator (process 0, {self.coordinator}) has not "
                   f"answered for {now - self._reached:.0f} s (--peer-timeout {self.timeout:g})")

  def _post(self, verdict: str) -> None:
    """Tells the other processes, waiting at most two seconds for the store."""
    def post():
      try:
        self._client.key_value_set(f"{KEY}/verdict/{self.index}", verdict, allow_overwrite=True)
      except Exception:
        pass
    t = threading.Thread(target=post, daemon=True)
    t.start()
    t.join(2.0)

  def _exit(self, reason: str, resumable: bool = True) -> None:
    """One line and out: the main thread may be stuck in a collective with
    the dead process, so nothing waits for it."""
    try:
      hint = self.resume_hint() if resumable else "its error says what to mend"
    except Exception:
      hint = RESUME
    line = f"capjax: {reason}: stopping process {self.index} of {self.count}; {hint}\n"
    os.write(2, line.encode())
    os._exit(EXIT_CODE)

  def finish(self, error: str | None = None) -> None:
    """(at the end of the command) A clean end tells the watcher not to wait
    for beats; an error is posted as the run's verdict."""
    if self._stop.is_set():
      return
    self._stop.set()
    try:
      if error is None:
        self._client.key_value_set(f"{KEY}/beat/{self.index}/n", "left", allow_overwrite=True)
    except Exception:
      pass
    if error is not None:
      self._post(f"failed|process {self.index} of {self.count} failed: {error}")


_watch: PeerWatch | None = None


def watch(timeout: float) -> PeerWatch | None:
  """Starts this process's watch (after jax.distributed.initialize)."""
  global _watch
  import jax
  from jax._src import distributed  # the runtime's client, as multihost_utils reaches it

  if timeout <= 0 or jax.process_count() == 1:
    return None
  _watch = PeerWatch(distributed.global_state.client, jax.process_index(),
                     jax.process_count(), timeout, coordinator()).start()
  return _watch


def current() -> PeerWatch | None:
  return _watch


def coordinator() -> str:
  """HOST:PORT of the run's coordination service."""
  from jax._src import distributed
  return distributed.global_state.coordinator_address
