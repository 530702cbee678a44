"""Parquet files with image bytes: img2dataset's (`key`, `jpg`, `txt` and
metadata columns) or Hugging Face's (an `Image` feature: a struct of `bytes`
and `path`). Read file by file, a batch of rows at a time.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

from pipeline import fs
from pipeline.sources.base import (FileUnit, SourceError, TruncatedInput, caption_list,
                                   input_files, reason)
from pipeline.sources.files import file_record

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "txt", "text", "captions")
BATCH_ROWS = 64


def _pyarrow():
  """pyarrow.parquet (imported when first needed), and what it raises for a
  damaged file: ArrowInvalid for a footer, OSError for pages (bad compressed
  data, thrift, an early end)."""
  import pyarrow
  import pyarrow.parquet as pq

  return pq, (pyarrow.ArrowException, OSError, EOFError)


def _reason(e: BaseException) -> str:
  return reason(e).split(". ")[0]  # pyarrow's first sentence


def _pick(path: str, names: Sequence[str], named: str | None, defaults: Sequence[str],
          what: str) -> str:
  """The column `named`, or the first of `defaults` present in the file."""
  if named is not None:
    if named not in names:
      raise SourceError(f"{path}: no {what} column {named!r} (it has {list(names)})")
    return named
  for name in defaults:
    if name in names:
      return name
  raise SourceError(f"{path}: no {what} column (none of {', '.join(defaults)}; "
                    f"it has {list(names)})")


def _columns(path: str, names: Sequence[str], image: str | None, caption: str | None,
             record_id: str | None) -> tuple[str, str, str | None]:
  """(image, caption, id or None for row numbers) columns of a file with `names`."""
  if record_id is not None and record_id not in names:
    raise SourceError(f"{path}: no id column {record_id!r} (it has {list(names)})")
  return (_pick(path, names, image, IMAGE_COLUMNS, "image"),
          _pick(path, names, caption, CAPTION_COLUMNS, "caption"),
          record_id if record_id is not None else "key" if "key" in names else None)


class ParquetUnit(FileUnit):
  """One Parquet file; its work is measured in rows (0 if its footer is unreadable)."""

  def __init__(self, path: str, image_column: str | None = None,
               caption_column: str | None = None, id_column: str | None = None):
    super().__init__(path)
    self.options = (image_column, caption_column, id_column)
    self.folder = os.path.dirname(fs.absolute(path))  # where an Image's path is
    self.stem = os.path.splitext(os.path.basename(path))[0]
    pq, unreadable = _pyarrow()
    try:
      with fs.open_read(path) as f:
        self.size = pq.read_metadata(f).num_rows
    except unreadable:
      self.size = 0  # `read` says why

  def _record(self, row: int, image: Any, caps: Any, record_id: Any) -> dict[str, Any]:
    rid = str(record_id) if record_id is not None else f"{self.stem}/{row}"
    captions = caption_list(caps)
    if isinstance(image, dict):  # an HF Image: its bytes, or a file beside the Parquet file
      if image.get("bytes") is None and image.get("path"):
        return file_record(rid, os.path.join(self.folder, image["path"]), captions)
      image = image.get("bytes")
    elif isinstance(image, str):  # a column of image paths
      return file_record(rid, os.path.join(self.folder, image), captions)
    record = {"id": rid, "image": image or b"", "captions": captions,
              "path": f"{self.path} row {row}"}
    if image is None:
      record["error"] = "no image"
    return record

  def read(self) -> Iterator[tuple[int, dict[str, Any]]]:
    pq, unreadable = _pyarrow()
    f = fs.open_read(self.path)  # a bucket's file read by ranges, not copied
    try:
      # Pages read as needed, through a small buffer: memory bounded by a
      # batch of rows rather than by a row group.
      pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
    except (FileNotFoundError, PermissionError):
      f.close()
      raise
    except unreadable as e:
      f.close()
      raise TruncatedInput(f"{self.path}: not a readable Parquet file ({_reason(e)})") from None
    row = 0
    with f, pf:
      image, caption, record_id = _columns(self.path, pf.schema_arrow.names, *self.options)
      needed = list(dict.fromkeys(c for c in (image, caption, record_id) if c is not None))
      try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=needed):
          images = batch.column(image).to_pylist()
          caps = batch.column(caption).to_pylist()
          ids = batch.column(record_id).to_pylist() if record_id else [None] * len(images)
          for i in range(len(images)):
            record = self._record(row, images[i], caps[i], ids[i])
            row += 1
            yield row, record
      except (*unreadable, UnicodeDecodeError) as e:  # that, in a string column
        raise TruncatedInput(f"{self.path}: damaged after {row} rows ({_reason(e)})") from None


class ParquetSource:
  """Parquet files of images and captions, read sequentially by `prepare`,
  one unit per file. Columns by name, or by default the first present of
  IMAGE_COLUMNS and CAPTION_COLUMNS, and `key` for ids (else file/row). A
  null image is a record with the error "no image"."""

  def __init__(self, spec: str, image_column: str | None = None,
               caption_column: str | None = None, id_column: str | None = None):
    pq, unreadable = _pyarrow()
    self.spec = fs.absolute(spec)
    self.options = (image_column, caption_column, id_column)
    self.files = [fs.absolute(p) for p in input_files(spec, (".parquet",))]
    for path in self.files:  # a missing column is found now, not midway through prepare
      try:
        with fs.open_read(path) as f:
          names = pq.read_schema(f).names
      except unreadable:
        continue  # its unit reports it
      _columns(path, names, *self.options)

  def units(self) -> list[ParquetUnit]:
    return [ParquetUnit(p, *self.options) for p in self.files]

  def __repr__(self) -> str:
    image, caption, record_id = self.options
    return (f"ParquetSource({self.spec!r}, files={len(self.files)}, image_column={image!r}, "
            f"caption_column={caption!r}, id_column={record_id!r})")
