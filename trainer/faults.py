"""What a run does about failures around it (`guard`, at the start of train).

Failures in a run's background threads go to a log file in the run
directory (`WORKDIR/logs/errors.log`), not to the console: when a save fails
(a full disk, say), Orbax's threads, asyncio and TensorStore each report it
with a traceback, dozens in all, while the run stops with one line of its own.
What a killed predecessor left in /dev/shm is removed, and a stopped
multi-process run says which checkpoint it resumes from."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import traceback

from pipeline import fs, shm
from trainer import peers

LOG = os.path.join("logs", "errors.log")
S3_COMMIT = "capjax-commit.json"  # an s3:// step's marker, uploaded after its files
GCS_COMMIT = "commit_success.txt"  # Orbax's, written last into a gs:// step


def log_path(workdir: str) -> str:
  """The run's error log: on this machine, also for a bucket run (in its
  `fs.local_twin`), so that a write to it never waits on the network."""
  return os.path.join(fs.local_twin(fs.absolute(workdir)), LOG)


class _File:
  """Appends to the log, opened for each write. The disk may be full now
  (a failed save fills it, then its folder is removed): text that could not
  be written is kept, up to PENDING characters, and written with the next
  write or at exit."""

  PENDING = 1 << 20

  def __init__(self, path: str):
    self.path = path
    self.pending = ""
    self.lock = threading.Lock()
    atexit.register(self.write, "")

  def write(self, text: str) -> None:
    with self.lock:
      text = self.pending + text
      if not text:
        return
      try:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
          f.write(text)
        self.pending = ""
      except OSError:
        self.pending = text[-self.PENDING:]

  def flush(self) -> None:
    pass


def errors_to_file(workdir: str) -> str:
  """Sends background tracebacks and the loggers of absl (Orbax), asyncio
  and capjax to `WORKDIR/logs/errors.log`; returns its path."""
  path = log_path(workdir)
  log = _File(path)

  def unraisable(u) -> None:
    log.write(f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n" + "".join(
        traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))

  def in_thread(args) -> None:
    log.write(f"in thread {args.thread.name if args.thread else '?'}:\n" + "".join(
        traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

  sys.unraisablehook = unraisable
  threading.excepthook = in_thread
  handler = logging.StreamHandler(log)
  handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
  for name in ("absl", "asyncio", "capjax"):
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.propagate = False
  return path


def committed_steps(workdir: str) -> list[int]:
  """The complete checkpoints' steps, from the folder names alone: locally a
  save in progress has a temporary name until it is complete; in a bucket,
  a step is complete once its commit marker is there."""
  root = fs.join(workdir, "checkpoints")
  names = [n for n in fs.listdir(root) if n.isdigit()]
  marker = {"gs": GCS_COMMIT, "s3": S3_COMMIT}.get(fs.scheme(root))
  if marker is not None:
    names = [n for n in names if fs.exists(fs.join(root, n, marker))]
  return sorted(int(n) for n in names)


def last_checkpoint(workdir: str) -> int | None:
  try:
    return max(committed_steps(workdir), default=None)
  except OSError:
    return None


def resume_hint(workdir: str) -> str:
  """What a stopped run says about starting again."""
  step = last_checkpoint(workdir)
  if step is None:
    return "no checkpoint yet: run the same command to start again"
  return f"the last checkpoint is step {step}: run the same command to resume from it"


def guard(workdir: str) -> None:
  """Background errors to the log (with the resource tracker's reports),
  this run's leftovers in /dev/shm removed, and the peer watch told where
  the run resumes from."""
  log = errors_to_file(workdir)
  removed = shm.claim(workdir)
  shm.start_tracker(log)
  if removed:
    print(f"removed {removed} files that a killed run left in /dev/shm", flush=True)
  watch = peers.current()
  if watch is not None:
    watch.resume_hint = lambda: resume_hint(workdir)
