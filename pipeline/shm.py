"""What a run keeps in /dev/shm, named so that it can be cleared safely.

A training run's loader makes POSIX semaphores (for Grain's worker queues)
and the image ring there, and `prepare`'s pool its semaphores. Python's
resource tracker removes them when their process dies, but a run killed
whole (SIGKILL to its process group, as a scheduler does) takes the tracker
with it, and each such run left about 25 `sem.mp-*` files behind (a prepare
11). `claim(workdir)` (for prepare, its output folder) names everything this
process makes there `capjax-RUN-PID-*` (RUN a hash of the folder) and,
before that, removes what processes of the same run that are no longer
alive left: never another run's files, never a living process's.

Worker processes call `die_with_parent`: a worker whose parent is gone exits
by itself instead of holding memory, the launcher's pipe and the tracker.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import multiprocessing
import os
import signal
import sys
import threading
import time

from pipeline import fs, processes

SHM = "/dev/shm"
_prefix: str | None = None


def run_tag(workdir: str) -> str:
  """`capjax-RUN`: the prefix of every file a run's processes make here."""
  return "capjax-" + hashlib.sha256(fs.absolute(workdir).encode()).hexdigest()[:8]


def leftovers(workdir: str) -> list[str]:
  """The files in /dev/shm made by processes of this run that are gone."""
  tag = run_tag(workdir)
  found = []
  for path in glob.glob(os.path.join(SHM, f"{tag}-*")) + glob.glob(
      os.path.join(SHM, f"sem.{tag}-*")):
    pid = os.path.basename(path).split(tag + "-", 1)[1].split("-", 1)[0]
    if pid.isdigit() and not processes.alive(int(pid)):
      found.append(path)
  return sorted(found)


def claim(workdir: str) -> int:
  """Removes this run's leftovers in /dev/shm and names what this process
  makes there from now on for the run; returns how many files it removed."""
  global _prefix
  removed = 0
  for path in leftovers(workdir):
    try:
      os.unlink(path)
      removed += 1
    except FileNotFoundError:  # another process of the run was quicker
      pass
  _prefix = f"{run_tag(workdir)}-{os.getpid()}"
  # multiprocessing names each semaphore SEMPREFIX-RANDOM; "/mp" by default.
  multiprocessing.current_process()._config["semprefix"] = "/" + _prefix
  return removed


def start_tracker(log: str) -> None:
  """Starts Python's resource tracker, if it is not running yet, with its
  output going to the file `log`. It removes what a killed process left and
  reports it in a few warning lines, and it holds the console's pipes as
  long as it lives, which a launcher reading them waits for."""
  from multiprocessing import resource_tracker

  os.makedirs(os.path.dirname(log), exist_ok=True)
  sys.stdout.flush()
  sys.stderr.flush()
  fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  saved = os.dup(1), os.dup(2)
  try:
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    resource_tracker.ensure_running()  # it inherits fds 1 and 2 as they are now
  finally:
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    for f in (fd, *saved):
      os.close(f)


def new_name(kind: str) -> str | None:
  """A fresh name for a shared-memory file of this run (None before `claim`:
  Python then picks a random one)."""
  if _prefix is None:
    return None
  return f"{_prefix}-{kind}-{os.urandom(4).hex()}"


def die_with_parent(parent: int, started_on_main_thread: bool) -> None:
  """(in a worker process) Exits when process `parent` is gone: at once,
  through the kernel, where the parent started the worker from its main
  thread (PR_SET_PDEATHSIG fires when the starting thread ends, so not from
  another thread), and within a second by polling in any case."""
  if sys.platform == "linux" and started_on_main_thread:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  if os.getppid() != parent:  # it died before the line above
    os._exit(1)

  def poll() -> None:
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)

  threading.Thread(target=poll, name="die-with-parent", daemon=True).start()
