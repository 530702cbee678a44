"""Peak memory of a command and every process it starts (workers included),
from /proc: what `ru_maxrss` cannot tell, since a pool's workers are not the
command's own children. Each process's own high-water mark (VmHWM, kept by
the kernel) is read while it lives and the marks are summed: sampling the
resident total instead misses short peaks, more often in a short run than a
long one, which biases any comparison of two sizes."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Sequence


def _hwm(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
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
  """Runs `cmd`; returns its CompletedProcess and the sum of the peak
  resident memory of every process in its tree, in bytes."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)
  marks: dict[int, int] = {}
  deadline = time.monotonic() + timeout
  out: dict[str, str] = {}
  reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"),
                                                          proc.communicate())))
  reader.start()
  while proc.poll() is None and time.monotonic() < deadline:
    for p in _tree(proc.pid):
      marks[p] = max(marks.get(p, 0), _hwm(p))
    time.sleep(interval)
  if proc.poll() is None:
    proc.kill()
  reader.join()
  return subprocess.CompletedProcess(cmd, proc.returncode, out.get("stdout", ""),
                                     out.get("stderr", "")), sum(marks.values())
