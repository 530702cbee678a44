"""A multi-process training run's stderr, passed through a small process that
outlives it, so that a fatal error in JAX's runtime reads as one line.

When the process holding JAX's coordination service (process 0) dies, the
runtime aborts every other process at once from a C++ thread, with a
30-line stack trace, before Python can do anything. The guard copies the
trainer's stderr through line by line until such a fatal message (an absl
`F` line, or Python's own "Fatal Python error"); from there on the text goes
to `WORKDIR/logs/errors.log` and the console gets one line: what happened,
and where the run resumes from. It ignores SIGINT and SIGTERM (Ctrl-C reaches
the trainer, which reports through it) and ends when the trainer and its
workers have all closed the pipe.

    python -m trainer.stderr_guard WORKDIR INDEX COUNT COORDINATOR
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

FATAL = re.compile(rb"^(F\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\] |Fatal Python error: )")


def start(workdir: str, index: int, count: int, coordinator: str) -> None:
  """Sends this process's stderr (fd 2, inherited by its workers) through the
  guard from now on."""
  read, write = os.pipe()
  subprocess.Popen([sys.executable, "-m", "trainer.stderr_guard", workdir, str(index),
                    str(count), coordinator], stdin=read, stdout=subprocess.DEVNULL,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  os.close(read)
  sys.stderr.flush()
  os.dup2(write, 2)
  os.close(write)


def summary(fatal: bytes, index: int, count: int, coordinator: str) -> str:
  text = fatal.decode(errors="replace").strip()
  if "coordination service" in text and ("Failed to send RPC" in text or "UNAVAILABLE" in text):
    what = f"lost the run's coordinator (process 0, {coordinator}), which holds JAX's runtime"
  elif "another task died" in text:
    what = "JAX's runtime reports that another process of the run died"
  else:
    what = "fatal error: " + FATAL.sub("", text.split("\n")[0])[:160]
  return f"process {index} of {count} {what}"


def main(argv: list[str]) -> int:
  from trainer import faults

  workdir, index, count, coordinator = argv[0], int(argv[1]), int(argv[2]), argv[3]
  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
  log_path = faults.log_path(workdir)
  console, log = sys.stderr.buffer, None
  for line in sys.stdin.buffer:
    if log is None and FATAL.match(line):
      os.makedirs(os.path.dirname(log_path), exist_ok=True)
      log = open(log_path, "ab")
      console.write(f"capjax: {summary(line, index, count, coordinator)}: stopped; "
                    f"{faults.resume_hint(workdir)} (details: {log_path})\n".encode())
      console.flush()
    if log is not None:
      log.write(line)
      log.flush()
    else:
      console.write(line)
      console.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
