"""Peak memory of a command and every process it starts (workers included),
sampled from /proc: what `ru_maxrss` cannot tell, since a pool's workers
are not the command's own children."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Sequence


def _rss(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _tree(pid: int) -> list[int]:
  """pid and its descendants, now."""
  found, todo = [], [pid]
  while todo:
    p = todo.pop()
    found.append(p)
    try:
      for tid in os.listdir(f"/proc/{p}/task"):
        with open(f"/proc/{p}/task/{tid}/children") as f:
          todo.extend(int(c) for c in f.read().split())
    except OSError:
      pass
  return found


def peak_rss(cmd: Sequence[str], env: dict | None = None, interval: float = 0.02,
             timeout: float = 600) -> tuple[subprocess.CompletedProcess, int]:
  """Runs `cmd`; returns its CompletedProcess and the largest total resident
  memory its process tree held at any sample, in bytes."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)
  peak, deadline = 0, time.monotonic() + timeout
  out: dict[str, str] = {}
  reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"),
                                                          proc.communicate())))
  reader.start()
  while proc.poll() is None and time.monotonic() < deadline:
    peak = max(peak, sum(_rss(p) for p in _tree(proc.pid)))
    time.sleep(interval)
  if proc.poll() is None:
    proc.kill()
  reader.join()
  return subprocess.CompletedProcess(cmd, proc.returncode, out.get("stdout", ""),
                                     out.get("stderr", "")), peak
