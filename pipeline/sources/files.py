"""Images on disk, listed by a COCO caption file, a CSV/JSON/JSONL table, or
the Karpathy-split `dataset_coco.json`: `FileSource`, random access.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import os
from typing import Any, Iterable, Sequence

from pipeline.sources.base import SourceError

Item = tuple[str, str, list[str]]  # (record id, image path, captions)


def _read_json(path: str):
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise SourceError(f"{path}: not valid JSON ({e})") from None


def file_record(record_id: str, path: str | None, captions: Sequence[str]) -> dict[str, Any]:
  """A record whose image is the file at `path`, or the reason it is unreadable."""
  record = {"id": record_id, "image": b"", "captions": list(captions), "path": path}
  try:
    with open(path, "rb") as f:
      record["image"] = f.read()
  except (OSError, TypeError, ValueError) as e:  # no path at all; a NUL in it
    record["error"] = f"unreadable file ({getattr(e, 'strerror', None) or e})"
  return record


class FileSource:
  """Records whose images are files on disk, read when accessed."""

  def __init__(self, items: Sequence[Item], description: str):
    self.items = list(items)
    self.description = description

  @property
  def key(self) -> str:
    """Changes with any record's id, image path or captions (prepare's plan)."""
    return hashlib.sha256(json.dumps(self.items).encode()).hexdigest()

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return file_record(*self.items[index])

  def window(self, start: int, stop: int) -> "FileSource":
    """Records [start, stop) alone, indexed from 0."""
    return FileSource(self.items[start:stop], f"{self.description} [{start}:{stop}]")

  def __repr__(self) -> str:
    return f"FileSource({self.description}, records={len(self)})"


def coco(annotation_file: str, image_dir: str) -> FileSource:
  """COCO caption annotations (`images`, `annotations`) and their image folder."""
  data = _read_json(annotation_file)
  if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
    raise SourceError(f"{annotation_file}: not a COCO caption file "
                      "(needs 'images' and 'annotations')")
  captions = collections.defaultdict(list)
  for i, ann in enumerate(data["annotations"]):
    try:
      captions[ann["image_id"]].append(str(ann["caption"]).strip())
    except KeyError as e:
      raise SourceError(f"{annotation_file}: annotation {i} has no {e}") from None
  items = [(str(image["id"]), os.path.join(image_dir, image["file_name"]),
            captions.get(image["id"], [])) for image in data["images"]]
  return FileSource(items, f"coco {os.path.abspath(annotation_file)!r}, images "
                    f"{os.path.abspath(image_dir)!r}")


KARPATHY_SPLITS = ("train", "restval", "val", "test")


def karpathy(path: str, image_root: str, splits: Sequence[str]) -> FileSource:
  """The Karpathy-split `dataset_coco.json`: `images[]` with `split`,
  `filepath`, `filename` and `sentences[].raw`; images under `image_root`."""
  data = _read_json(path)
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise SourceError(f"{path}: not a Karpathy split file (needs an 'images' list)")
  for s in splits:
    if s not in KARPATHY_SPLITS:
      raise SourceError(f"{path}: unknown split {s!r} (one of {', '.join(KARPATHY_SPLITS)})")
  items = []
  for n, image in enumerate(data["images"]):
    try:
      if image["split"] not in splits:
        continue
      record_id = str(image.get("cocoid", image.get("imgid", n)))
      file = os.path.join(image_root, image.get("filepath", ""), image["filename"])
      items.append((record_id, file, [str(s["raw"]).strip() for s in image["sentences"]]))
    except (KeyError, TypeError) as e:
      raise SourceError(f"{path}: image {n} lacks {e}") from None
  return FileSource(items, f"karpathy {os.path.abspath(path)!r} {'+'.join(splits)}, images "
                    f"{os.path.abspath(image_root)!r}")


def _rows(path: str) -> Iterable[dict]:
  if path.endswith(".csv"):
    with open(path, newline="") as f:
      yield from csv.DictReader(f)
  elif path.endswith(".jsonl"):
    with open(path) as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            yield json.loads(line)
          except json.JSONDecodeError as e:
            raise SourceError(f"{path}:{n}: not valid JSON ({e})") from None
  else:
    rows = _read_json(path)
    if not isinstance(rows, list):
      raise SourceError(f"{path}: expected a JSON list of objects")
    yield from rows


def table(path: str, image_column: str, caption_column: str) -> FileSource:
  """Rows of a CSV/JSON/JSONL table, image paths relative to the table; a
  caption cell may hold one caption or a list; rows of one image are grouped."""
  base = os.path.dirname(os.path.abspath(path))
  captions: dict[str, list[str]] = collections.defaultdict(list)
  for n, row in enumerate(_rows(path), 1):
    for column in (image_column, caption_column):
      if column not in row:
        raise SourceError(f"{path}: record {n} has no column {column!r} "
                          f"(it has {sorted(row)})")
    value = row[caption_column]
    caps = value if isinstance(value, list) else [value]
    captions[row[image_column]].extend(str(c).strip() for c in caps)
  items = [(image, os.path.join(base, image), caps) for image, caps in captions.items()]
  return FileSource(items, f"table {os.path.abspath(path)!r}")
