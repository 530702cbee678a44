"""WebDataset tar shards as img2dataset writes them: per sample `KEY.jpg`,
`KEY.txt` and `KEY.json`, the members of one sample consecutive. Read file
by file, in streaming mode: one sample in memory at a time.

A tar cut short is told from a complete one by its end-of-archive block (a
block of zeros where the next header would be): tarfile itself ends quietly
at a missing or partial header after the first, so its last header block is
kept and looked at when it stops.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import tarfile
import zlib
from typing import Any, Iterator

from pipeline import fs
from pipeline.sources.base import FileUnit, TruncatedInput, caption_list, input_files

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# The webdataset library's split of a member path into key and extension:
# the key runs up to the first dot of the basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _field(data: Any, name: str) -> Any:
  """`name` of a JSON object, a path into nested objects with "/"; None if absent."""
  if isinstance(data, dict) and name in data:
    return data[name]
  for part in name.split("/"):
    if not isinstance(data, dict) or part not in data:
      return None
    data = data[part]
  return data


def _record(tar_path: str, key: str, members: dict[str, bytes],
            caption_field: str | None) -> dict[str, Any]:
  """One sample's record from its members' bytes (extension -> data)."""
  record = {"id": key, "image": b"", "captions": [], "path": f"{tar_path}:{key}"}
  image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
  try:
    if caption_field is None and "txt" in members:
      record["captions"] = caption_list(members["txt"].decode("utf-8", "replace"))
    elif "json" in members:
      meta = json.loads(members["json"])
      record["captions"] = caption_list(_field(meta, caption_field or "caption"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    record["error"] = f"unreadable json ({e})"
    return record
  if image is None:
    record["error"] = "no image"
  else:
    record["image"] = image
  return record


class _Cut(Exception):
  """The archive ends before its end-of-archive block."""


# What reading a tar cut short or damaged raises (compressed ones included).
_DAMAGE = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)


def _header_class(last: list) -> type:
  """A TarInfo that keeps the last header block tarfile read in `last`."""

  class Header(tarfile.TarInfo):
    @classmethod
    def frombuf(cls, buf, encoding, errors):
      last[:] = [buf]
      return super().frombuf(buf, encoding, errors)

  return Header


class WebDatasetUnit(FileUnit):
  """One tar file; its work is measured in bytes read."""

  def __init__(self, path: str, caption_field: str | None = None):
    super().__init__(path)
    self.caption_field = caption_field

  def read(self) -> Iterator[tuple[int, dict[str, Any]]]:
    yielded, last = 0, []

    def cut(e: BaseException) -> TruncatedInput:
      return TruncatedInput(f"{self.path}: truncated after {yielded} samples "
                            f"({str(e) or type(e).__name__})")

    with fs.open_read(self.path) as f:  # a bucket's tar streamed, not copied
      try:
        tar = tarfile.open(fileobj=f, mode="r|*", tarinfo=_header_class(last))
      except TypeError:  # what tarfile's gzip header reader raises when cut short
        raise cut(_Cut("a gzip header cut short")) from None
      except _DAMAGE as e:
        raise cut(e) from None
      key, members = None, {}
      with tar:
        try:
          for info in tar:
            tar.members = []  # tarfile keeps every header it reads: a tar's worth
            if not info.isfile():
              continue
            m = _KEY_EXT.match(info.name)
            base = os.path.basename(info.name)
            if m is None or base.startswith("__") and base.endswith("__"):
              continue  # no extension, or webdataset's per-shard metadata
            name, ext = m.group(1), m.group(2).lower()
            if name != key:
              if key is not None:
                yield min(f.tell(), self.size), _record(self.path, key, members,
                                                        self.caption_field)
                yielded += 1
              key, members = name, {}
            wanted = ext in IMAGE_EXTENSIONS or ext in ("txt", "json")
            if wanted and ext not in members:  # the others are skipped unread
              members[ext] = tar.extractfile(info).read()
          buf = last[0] if last else b""
          # A full block of zeros is the end-of-archive marker; part of one, the
          # marker cut short (nothing lost); anything else, a cut or damage.
          if not buf or buf.count(0) != len(buf):
            raise _Cut("no end-of-archive block" if not buf else "a header cut short"
                       if len(buf) < tarfile.BLOCKSIZE else "a damaged header")
        except (_Cut, *_DAMAGE) as e:
          raise cut(e) from None
      if key is not None:  # the archive read to its end: the rest is padding
        yield self.size, _record(self.path, key, members, self.caption_field)


class WebDatasetSource:
  """WebDataset tar shards (img2dataset's layout), read sequentially by
  `prepare`, one unit per tar. The image is the first member present of
  jpg, jpeg, png, webp; the captions `caption_field` of the .json (nested
  with "/"; a string or a list) if given, else the .txt, else the .json's
  "caption"."""

  def __init__(self, spec: str, caption_field: str | None = None):
    self.spec = fs.absolute(spec)
    self.caption_field = caption_field
    self.files = [fs.absolute(p) for p in input_files(spec, (".tar",))]

  def units(self) -> list[WebDatasetUnit]:
    return [WebDatasetUnit(p, self.caption_field) for p in self.files]

  def __repr__(self) -> str:
    return (f"WebDatasetSource({self.spec!r}, files={len(self.files)}, "
            f"caption_field={self.caption_field!r})")
