"""A bounded local copy of bucket data (`capjax prepare`d shards in s3://,
which ArrayRecord cannot read in place), kept across runs in
`CAPJAX_CACHE/data/`: only files rewritten in the bucket since are copied
again, and processes sharing the cache take turns (an flock)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from typing import Iterator

from pipeline import processes
from pipeline.fs import copy, join, local_twin, version, write_text

_INDEX = "capjax-cache.json"  # {name: [size, version key]} of the objects copied
SPARE = 1 << 30  # left free on the cache's disk
_LOCK = ".capjax-lock"  # who holds the folder, for those waiting


@contextlib.contextmanager
def _locked(folder: str, what: str, patience: float = 600) -> Iterator[None]:
  """The cache folder `folder` to this process alone (an flock, which NFS
  honours between hosts; released when the holder exits or dies). Waits
  while the holder copies; an OSError once the folder has not changed for
  `patience` seconds while locked."""
  import fcntl
  import time

  with open(os.path.join(folder, _LOCK), "a+") as lock:
    seen, since, told = None, time.monotonic(), False
    while True:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        pass
      lock.seek(0)
      holder = lock.read().strip() or "another process"
      now = [(e.name, e.stat().st_size) for e in os.scandir(folder)]
      if now != seen:
        seen, since = now, time.monotonic()
      elif time.monotonic() - since > patience:
        raise OSError(f"{what}: {folder} is held by {holder}, which has copied nothing "
                      f"for {patience:.0f} s: if it is stuck, stop it and run again")
      if not told:
        print(f"{what}: waiting for {holder}, copying into {folder}", file=sys.stderr,
              flush=True)
        told = True
      time.sleep(0.5)
    try:
      lock.truncate(0)
      lock.write(f"process {processes.owner()}\n")
      lock.flush()
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def cached(folder: str, names: list[str], what: str) -> str:
  """A local folder holding the files `names` of the bucket folder `folder`,
  kept in the cache across runs (`CAPJAX_CACHE`, one copy per folder): only
  files rewritten in the bucket since are downloaded again. When
  they would not fit on the cache's disk, an OSError naming `what` and the
  sizes, before anything is downloaded. Processes sharing the cache (on this
  host, or hosts sharing a home) take turns: one copies, the others then
  find the files there."""
  local = local_twin(folder, "data")
  os.makedirs(local, exist_ok=True)
  with _locked(local, what):
    _refresh(folder, names, what, local)
  return local


def _refresh(folder: str, names: list[str], what: str, local: str) -> None:
  from concurrent import futures

  index_path = os.path.join(local, _INDEX)
  try:
    with open(index_path) as f:
      index = json.load(f)
  except (OSError, ValueError):
    index = {}
  with futures.ThreadPoolExecutor(16) as pool:
    stats = dict(zip(names, pool.map(lambda n: list(version(join(folder, n))), names)))
    todo = [n for n in names if index.get(n) != stats[n]
            or not os.path.isfile(os.path.join(local, n))
            or os.path.getsize(os.path.join(local, n)) != stats[n][0]]
    need = sum(stats[n][0] for n in todo)
    free = shutil.disk_usage(local).free
    if todo and need + SPARE > free:
      raise OSError(f"{what} {folder}: {need / 2**30:.1f} GiB to copy into {local}, "
                    f"{free / 2**30:.1f} GiB free there: set CAPJAX_CACHE to a larger disk, "
                    "or mount the bucket (mountpoint-s3) and give its local path")
    if todo:
      print(f"{what}: copying {len(todo)} files ({need / 2**20:,.0f} MiB) of {folder} into "
            f"{local}", file=sys.stderr, flush=True)
    list(pool.map(lambda name: copy(join(folder, name), os.path.join(local, name)), todo))
  # Files the folder dropped, and what a killed copy left (the lock is ours).
  for name in set(os.listdir(local)) - set(names) - {_INDEX, _LOCK}:
    os.remove(os.path.join(local, name))
  write_text(index_path, json.dumps({n: stats[n] for n in names}))
