"""One file-system layer for run directories on local disk, `gs://` and `s3://`.

Paths stay strings; every read and write of a run directory goes through
here. Buckets go through etils.epath on fsspec (gcsfs, s3fs), whose clients
find credentials by their standard chains (application default credentials;
AWS environment variables, profiles and instance roles) and their endpoints
from `STORAGE_EMULATOR_HOST` and `AWS_ENDPOINT_URL_S3`. TensorFlow's gfile
is kept out (`EPATH_USE_TF=false`): its endpoint cannot be redirected.

Every file written here appears whole or not at all: locally a temporary
file renamed over it; in a bucket (no rename there) one object upload,
aborted, not committed, when the write fails or is interrupted. Files that
grow (metrics.jsonl, TensorBoard's events) are written in a local stage
(`Stage`) and uploaded whole at each flush; what the run only reads is
downloaded into it.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from typing import Iterator

from pipeline import processes

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


def _filesystem(path: str):
  """(the fsspec file system, the path within it) of a bucket path, its
  clients configured as `_epath` configures them."""
  import fsspec
  _epath(path)
  return fsspec.core.url_to_fs(path)


def version(path: str) -> tuple[int, str]:
  """(size in bytes, a key that changes when the file is rewritten: its
  modification time locally; in a bucket from its ETag or generation)."""
  if not is_bucket(path):
    st = os.stat(path)
    return st.st_size, str(st.st_mtime_ns)
  filesystem, name = _filesystem(path)
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


@contextlib.contextmanager
def _whole(path: str) -> Iterator:
  """A binary file to write `path` through, there only once the block ends
  without an exception, else absent (or the file it replaces untouched).
  In a bucket an fsspec file, whose close() would commit the upload also
  when an exception (Ctrl-C, a read error) leaves the block: the upload is
  aborted instead. Locally a temporary file renamed over `path`."""
  if not is_bucket(path):
    tmp = f"{path}.tmp-{processes.owner()}-{threading.get_ident()}"
    try:
      with open(tmp, "wb") as f:
        yield f
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return
  filesystem, name = _filesystem(path)
  f = filesystem.open(name, "wb")
  try:
    yield f
  except BaseException:
    try:
      f.discard()  # s3: the multipart upload aborted; gs: the resumable one cancelled
    finally:
      f.closed = True  # never committed, not even when collected
    raise
  f.close()


def write_text(path: str, text: str) -> None:
  """`path` whole or not at all (see `_whole`)."""
  with _whole(path) as f:
    f.write(text.encode("utf-8"))


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


def open_read(path: str):
  """A file to read, local or in a bucket (read in blocks as it is consumed,
  never downloaded whole)."""
  return _open(path, "rb")


def glob(pattern: str) -> list[str]:
  """The bucket paths a glob pattern matches, sorted."""
  filesystem, name = _filesystem(pattern)
  prefix = scheme(pattern) + "://"
  return sorted(prefix + p for p in filesystem.glob(name))


def copy(src: str, dst: str) -> None:
  """One file, any store to any store, whole or not at all (to a bucket:
  one object upload, aborted if the copy fails or is interrupted)."""
  if not is_bucket(dst):
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
  elif scheme(src) == scheme(dst):  # within the store: one server-side copy
    filesystem, name = _filesystem(src)
    filesystem.copy(name, _filesystem(dst)[1])
    return
  with _open(src, "rb") as f, _whole(dst) as out:
    shutil.copyfileobj(f, out, 1 << 22)


def copytree(src: str, dst: str, skip: tuple[str, ...] = ()) -> list[str]:
  """Every file of the folder `src` to the same place under `dst` (names
  starting with a `skip` prefix left out); returns the relative paths."""
  names = [n for n in files(src) if not n.startswith(skip)]
  for name in names:
    copy(join(src, name), join(dst, name))
  return names


NEXT = ".capjax-next"  # a bucket folder's next contents, uploaded beside it


def publish(local: str, remote: str, last: tuple[str, ...]) -> None:
  """The local folder `local` over the bucket folder `remote`, which stays
  readable as it was until the new files are all in the bucket: they are
  uploaded beside it first (`remote/.capjax-next/`; an interruption there
  leaves the old folder whole, and the next publish starts that again).
  Then, copied server-side (seconds, however large), the folder switches:
  the files of `last` (what readers open first, a model's config.json) are
  removed, then those the new folder lacks; the new files take their places,
  those of `last` last, so a reader never takes a mix for a whole."""
  nxt = join(remote, NEXT)
  rmtree(nxt)
  names = copytree(local, nxt)
  for name in last:
    remove(join(remote, name))
  for name in sorted(set(files(remote)) - set(names)):
    if not name.startswith(NEXT + "/"):
      remove(join(remote, name))
  for name in [n for n in names if n not in last] + [n for n in names if n in last]:
    copy(join(nxt, name), join(remote, name))
  rmtree(nxt)


def move(src: str, dst: str) -> None:
  """A folder to a new name: a rename locally; in a bucket a server-side
  copy, then the original removed."""
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
  """A new folder in `parent` for this process (stage-HOST_PID-...), removed
  at exit; those of this host's processes no longer alive (killed) are
  removed now, never another host's (`parent` may be on a shared home)."""
  os.makedirs(parent, exist_ok=True)
  for name in os.listdir(parent):
    if processes.gone(name, "stage-"):
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
  root = tempfile.mkdtemp(prefix=f"stage-{processes.owner()}-", dir=parent)
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
