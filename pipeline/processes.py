"""Which process owns a folder or file, and whether it is provably gone.

Local stages, scratch folders and partial copies carry their owner's host
and PID in their names. A home directory (and so `~/.cache/capjax`) is often
shared between hosts over NFS, where a PID says nothing about another host's
processes: a process removes what it finds only when the owner ran on its
own host and that PID is no longer alive there.
"""

from __future__ import annotations

import os
import re
import socket


def host() -> str:
  """This host's name as used in owners' names (`CAPJAX_HOST` overrides:
  hosts whose names collide, and tests that play two hosts on one)."""
  name = os.environ.get("CAPJAX_HOST") or socket.gethostname() or "localhost"
  return re.sub(r"[^A-Za-z0-9.-]+", "-", name)


def alive(pid: int) -> bool:
  """Whether process `pid` of this host exists."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: alive
    pass
  return True


def owner() -> str:
  """This process as HOST_PID (a host name has no "_"), the prefix of what
  it names for itself."""
  return f"{host()}_{os.getpid()}"


def gone(name: str, prefix: str) -> bool:
  """Whether `name` (PREFIX + HOST_PID-..., from `owner()`) belongs to a
  process of this host that is no longer alive. Another host's, or a name
  of any other shape, is never taken for gone."""
  if not name.startswith(prefix):
    return False
  m = re.match(r"([A-Za-z0-9.-]+)_(\d+)(-|$)", name[len(prefix):])
  return bool(m) and m.group(1) == host() and not alive(int(m.group(2)))
