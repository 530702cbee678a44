"""One file-system layer for run directories on local disk, `gs://` and `s3://`.

Paths stay strings; every read and write of a run directory goes through
here. Buckets go through etils.epath on fsspec (gcsfs, s3fs), whose clients
find credentials by their standard chains (application default credentials;
AWS environment variables, profiles and instance roles) and their endpoints
from `STORAGE_EMULATOR_HOST` and `AWS_ENDPOINT_URL_S3`. TensorFlow's gfile
is kept out (`EPATH_USE_TF=false`): its endpoint cannot be redirected.

Buckets have no rename: a text written here appears whole as one object
upload. Files that grow (metrics.jsonl, TensorBoard's events) are written
in a local stage (`Stage`) and uploaded whole at each flush; what the run
only reads is downloaded into it.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Iterator

os.environ.setdefault("EPATH_USE_TF", "false")

BUCKETS = ("gs", "s3")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(path: str) -> str | None:
  """`gs`, `s3` (or another URL's scheme) for a URL; None for a local path."""
  m = _URL.match(str(path))
  return m.group(1) if m else None


def is_bucket(path: str) -> bool:
  return scheme(path) in BUCKETS


class _QuietAnonymous(logging.Filter):
  """gcsfs warns at each call that it found no credentials when a bucket
  (an emulator's, or a public one) needs none; it then works."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Could not determine bucket type" not in record.getMessage()


logging.getLogger("gcsfs").addFilter(_QuietAnonymous())


_configured = False


def _epath(path: str):
  """etils.epath's Path; its clients list folders afresh each time (another
  process or host may have written there since)."""
  global _configured
  if not _configured:
    import fsspec.config
    for proto in ("gs", "gcs", "s3", "s3a"):
      fsspec.config.conf.setdefault(proto, {}).setdefault("use_listings_cache", False)
    _configured = True
  from etils import epath
  return epath.Path(path)


def absolute(path: str) -> str:
  """A bucket path without a trailing slash; a local one made absolute."""
  return str(path).rstrip("/") if is_bucket(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  return os.path.join(path, *parts)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_bucket(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_bucket(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _epath(path).is_file() if is_bucket(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """The names in a folder; [] when there is none."""
  if not is_bucket(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  p = _epath(path)
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def version(path: str) -> tuple[int, str]:
  """(size in bytes, a key that changes when the object is rewritten with
  other content: from its ETag or generation) of a bucket file."""
  import fsspec
  _epath(path)  # the clients configured
  filesystem, name = fsspec.core.url_to_fs(path)
  info = filesystem.info(name)
  return int(info["size"]), filesystem.ukey(name)


def makedirs(path: str) -> None:
  if not is_bucket(path):  # a bucket's folders are the prefixes of its objects
    os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
  if is_bucket(path):
    return _epath(path).read_text()
  with open(path, encoding="utf-8") as f:
    return f.read()


def read_bytes(path: str) -> bytes:
  with _open(path, "rb") as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """`path` whole or not at all: one object upload to a bucket; locally a
  temporary file renamed over it."""
  if is_bucket(path):
    _epath(path).write_text(text)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def remove(path: str) -> None:
  if is_bucket(path):
    p = _epath(path)
    if p.exists():
      p.unlink()
  elif os.path.exists(path):
    os.remove(path)


def rmtree(path: str) -> None:
  if is_bucket(path):
    p = _epath(path)
    if p.exists():
      p.rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def _walk(path: str) -> Iterator[str]:
  """Every file under `path`, relative to it."""
  if not is_bucket(path):
    for root, _, files in os.walk(path):
      for name in files:
        yield os.path.relpath(os.path.join(root, name), path)
    return
  for child in _epath(path).iterdir():
    if child.is_dir():
      yield from (os.path.join(child.name, f) for f in _walk(str(child)))
    else:
      yield child.name


def files(path: str) -> list[str]:
  """Every file under the folder `path`, relative to it, sorted; [] when
  there is none."""
  return sorted(_walk(path)) if isdir(path) else []


def _open(path: str, mode: str):
  return _epath(path).open(mode) if is_bucket(path) else open(path, mode)


def copy(src: str, dst: str) -> None:
  """One file, any store to any store (to a bucket: one object upload)."""
  if not is_bucket(dst):
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
  if not is_bucket(src) and not is_bucket(dst):
    shutil.copyfile(src, dst)
    return
  with _open(src, "rb") as f, _open(dst, "wb") as out:
    shutil.copyfileobj(f, out, 1 << 22)


def copytree(src: str, dst: str, skip: tuple[str, ...] = ()) -> list[str]:
  """Every file of the folder `src` to the same place under `dst` (names
  starting with a `skip` prefix left out); returns the relative paths."""
  names = [n for n in files(src) if not n.startswith(skip)]
  for name in names:
    copy(join(src, name), join(dst, name))
  return names


def publish(local: str, remote: str, last: tuple[str, ...]) -> None:
  """The local folder `local` over the bucket folder `remote`, never seen as
  a whole mixing old and new files by a reader that opens a file of `last`
  first (a model's config.json): those are removed first and uploaded last,
  and files `remote` has and `local` lacks go before them."""
  names = files(local)
  for name in last:
    remove(join(remote, name))
  for name in sorted(set(files(remote)) - set(names)):
    remove(join(remote, name))
  for name in [n for n in names if n not in last] + [n for n in names if n in last]:
    copy(os.path.join(local, name), join(remote, name))


def move(src: str, dst: str) -> None:
  """A folder to a new name: a rename locally; in a bucket a copy, then
  the original removed."""
  if not is_bucket(src) and not is_bucket(dst):
    os.rename(src, dst)
    return
  copytree(src, dst)
  rmtree(src)


# -- a local stage for a bucket run directory --------------------------------


def cache_root() -> str:
  return os.environ.get("CAPJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                     "capjax"))


def _slug(text: str) -> str:
  """`text` as one file name."""
  return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def local_twin(path: str, kind: str = "runs") -> str:
  """A bucket folder's folder on this machine, kept across runs (a run
  directory's logs and the stages of the processes using it; with kind
  "data", a dataset's copy); a local path itself."""
  if not is_bucket(path):
    return path
  path = absolute(path)
  name = _slug(path.split("://", 1)[1])[-60:].strip("-")
  digest = hashlib.sha256(path.encode()).hexdigest()[:8]
  return os.path.join(cache_root(), kind, f"{scheme(path)}-{name}-{digest}")


def _process_dir(parent: str) -> str:
  """A new folder in `parent` for this process, removed at exit; those of
  processes no longer alive (killed) are removed now."""
  from pipeline.shm import alive
  os.makedirs(parent, exist_ok=True)
  for name in os.listdir(parent):
    pid = name.split("-")[1] if name.startswith("stage-") else ""
    if pid.isdigit() and not alive(int(pid)):
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
  root = tempfile.mkdtemp(prefix=f"stage-{os.getpid()}-", dir=parent)
  atexit.register(shutil.rmtree, root, True)
  return root


def _download(remote: str, local: str) -> bool:
  """A file or a folder from the bucket to `local`; False if there is none."""
  if isfile(remote):
    copy(remote, local)
  elif isdir(remote):
    copytree(remote, local)
  else:
    return False
  return True


class Stage:
  """Local copies of a bucket run directory's files for this process
  (`WORKDIR`-relative paths): `pull` downloads, `push` uploads whole. For a
  local run directory it is the directory itself and both do nothing. The
  stage is removed at exit; stages of processes no longer alive go when the
  next one opens."""

  def __init__(self, workdir: str):
    self.workdir = absolute(workdir)
    self.remote = is_bucket(workdir)
    if not self.remote:
      self.root = self.workdir
      return
    self.root = _process_dir(local_twin(self.workdir))

  def local(self, rel: str) -> str:
    return os.path.join(self.root, rel)

  def pull(self, rel: str) -> str:
    """Downloads `rel` (a file or a folder) if the bucket has it; its local path."""
    local = self.local(rel)
    if self.remote:
      _download(join(self.workdir, rel), local)
    return local

  def push(self, rel: str) -> None:
    """Uploads `rel` (a file, or every file of a folder) whole."""
    if not self.remote:
      return
    local = self.local(rel)
    if os.path.isdir(local):
      copytree(local, join(self.workdir, rel))
    elif os.path.exists(local):
      copy(local, join(self.workdir, rel))


_scratch: tuple[int, str] | None = None


def scratch() -> str:
  """This process's local scratch folder, removed at exit."""
  global _scratch
  if _scratch is None or _scratch[0] != os.getpid():  # not a forked parent's
    _scratch = os.getpid(), _process_dir(os.path.join(cache_root(), "scratch"))
  return _scratch[1]


def fetched(path: str) -> str:
  """A local copy of a bucket file or folder (downloaded once per process,
  into its scratch folder); a local path itself."""
  if not is_bucket(path):
    return path
  local = os.path.join(scratch(), _slug(absolute(path)))
  if not os.path.exists(local) and not _download(path, local):
    raise FileNotFoundError(f"{path}: no such file or folder")
  return local


# -- a bounded local cache of bucket data -------------------------------------

_INDEX = "capjax-cache.json"  # {name: [size, version key]} of the objects copied
_SPARE = 1 << 30  # left free on the cache's disk


def cached(folder: str, names: list[str], what: str) -> str:
  """A local folder holding the files `names` of the bucket folder `folder`,
  kept in the cache across runs (`CAPJAX_CACHE`, one copy per folder): only
  files rewritten in the bucket since are downloaded again. When
  they would not fit on the cache's disk, an OSError naming `what` and the
  sizes, before anything is downloaded."""
  from concurrent import futures

  local = local_twin(folder, "data")
  os.makedirs(local, exist_ok=True)
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
    if todo and need + _SPARE > free:
      raise OSError(f"{what} {folder}: {need / 2**30:.1f} GiB to copy into {local}, "
                    f"{free / 2**30:.1f} GiB free there: set CAPJAX_CACHE to a larger disk, "
                    "or mount the bucket (mountpoint-s3) and give its local path")
    if todo:
      print(f"{what}: copying {len(todo)} files ({need / 2**20:,.0f} MiB) of {folder} into "
            f"{local}", file=sys.stderr, flush=True)

    def one(name: str) -> None:
      tmp = os.path.join(local, f"{name}.tmp-{os.getpid()}")
      try:
        copy(join(folder, name), tmp)
        os.replace(tmp, os.path.join(local, name))
      finally:
        if os.path.exists(tmp):
          os.remove(tmp)

    list(pool.map(one, todo))
  for name in set(os.listdir(local)) - set(names) - {_INDEX}:  # files the folder dropped
    if ".tmp-" not in name:
      os.remove(os.path.join(local, name))
  write_text(index_path, json.dumps({n: stats[n] for n in names}))
  return local
