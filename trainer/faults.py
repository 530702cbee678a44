"""Failures in a run's background threads go to a log file in the run
directory (`WORKDIR/logs/errors.log`), not to the console: when a save fails
(a full disk, say), Orbax's threads, asyncio and TensorStore each report it
with a traceback, dozens in all, while the run stops with one line of its own."""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback

LOG = os.path.join("logs", "errors.log")


class _File:
  """Appends to the log, opened for each write (the disk may be full now and
  have room later); a write that fails is dropped."""

  def __init__(self, path: str):
    self.path = path

  def write(self, text: str) -> None:
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      with open(self.path, "a") as f:
        f.write(text)
    except OSError:
      pass


def errors_to_file(workdir: str) -> str:
  """Sends background tracebacks and the loggers of absl (Orbax), asyncio
  and capjax to `WORKDIR/logs/errors.log`; returns its path."""
  path = os.path.join(workdir, LOG)
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
