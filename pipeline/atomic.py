"""Outputs that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from pipeline import fs


@contextlib.contextmanager
def folder(out_dir: str, last: tuple[str, ...] = ("config.json",)) -> Iterator[str]:
  """Yields a temporary folder beside `out_dir`; when the block completes it
  replaces `out_dir`, and when it fails it is removed, leaving `out_dir` as it
  was. For a bucket `out_dir` (no rename) the folder is local and published
  with `last` (what readers open first) uploaded last: see `fs.publish`."""
  if fs.is_bucket(out_dir):
    tmp = tempfile.mkdtemp(dir=fs.scratch())
    try:
      yield tmp
      fs.publish(tmp, out_dir, last)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    return
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}-", dir=parent)
  try:
    yield tmp
    if os.path.exists(out_dir):  # the old one renamed aside: never a moment without either
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}-old-", dir=parent)
      os.rename(out_dir, os.path.join(old, "folder"))
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
