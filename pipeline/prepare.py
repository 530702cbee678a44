"""`capjax prepare`: caption sources into ArrayRecord shards.

Sources: COCO caption annotation JSON (with its image folder), and CSV, JSON
(a list of objects) or JSONL tables whose image and caption column names are
flags, image paths relative to the table. Captions of the same image are
grouped into one record. Images are read and checked in parallel worker
processes; unreadable ones are skipped, counted and reported by reason. The
output is written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import collections
import csv
import json
import multiprocessing
import os
from typing import Iterable

from PIL import Image

from pipeline import atomic, records

Item = tuple[str, str, list[str]]  # (record id, image path, captions)


class SourceError(ValueError):
  """Bad input, with a message that names the file and the record."""


def coco_items(annotation_file: str, image_dir: str) -> list[Item]:
  with open(annotation_file) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise SourceError(f"{annotation_file}: not valid JSON ({e})") from None
  if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
    raise SourceError(f"{annotation_file}: not a COCO caption file "
                      "(needs 'images' and 'annotations')")
  captions = collections.defaultdict(list)
  for i, ann in enumerate(data["annotations"]):
    try:
      captions[ann["image_id"]].append(str(ann["caption"]).strip())
    except KeyError as e:
      raise SourceError(f"{annotation_file}: annotation {i} has no {e}") from None
  items = []
  for image in data["images"]:
    path = os.path.join(image_dir, image["file_name"])
    items.append((str(image["id"]), path, captions.get(image["id"], [])))
  return items


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
    with open(path) as f:
      rows = json.load(f)
    if not isinstance(rows, list):
      raise SourceError(f"{path}: expected a JSON list of objects")
    yield from rows


def table_items(path: str, image_column: str, caption_column: str) -> list[Item]:
  """Rows of a CSV/JSON/JSONL table; a caption cell may hold one caption or a list."""
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
  return [(image, os.path.join(base, image), caps) for image, caps in captions.items()]


def _load(item: Item) -> tuple[bytes | None, str | None]:
  """The image's bytes, or the reason it is skipped."""
  record_id, path, caps = item
  if not caps:
    return None, "no captions"
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return None, f"unreadable file ({e.strerror})"
  if not data:
    return None, "empty file"
  try:
    with Image.open(path) as img:
      img.verify()
  except Image.DecompressionBombError:
    return None, "image larger than the decompression-bomb limit"
  except Exception:  # Pillow raises many types for damaged files.
    return None, "not a readable image"
  return records.encode_record(record_id, data, caps), None


def prepare(items: list[Item], out_dir: str, num_shards: int = 8,
            workers: int | None = None, source: str = "") -> dict:
  """Writes `items` as shards under `out_dir`; returns the summary (also saved)."""
  with atomic.folder(out_dir) as tmp:
    kept, skipped = [], collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)
    with multiprocessing.get_context("forkserver").Pool(workers or os.cpu_count()) as pool:
      for item, (data, reason) in zip(items, pool.imap(_load, items, chunksize=32)):
        if data is None:
          skipped[reason] += 1
          if len(examples[reason]) < 3:
            examples[reason].append(item[1])
        else:
          kept.append((data, len(item[2])))
    num_shards = max(1, min(num_shards, len(kept)))
    # Contiguous shards keep the source's order: record k is item k kept.
    bounds = [len(kept) * s // num_shards for s in range(num_shards + 1)]
    for s in range(num_shards):
      records.write_shard(records.shard_path(tmp, s, num_shards),
                          [d for d, _ in kept[bounds[s]:bounds[s + 1]]])
    summary = {
        "source": source, "records": len(kept), "captions": sum(n for _, n in kept),
        "shards": num_shards, "skipped": dict(skipped),
        "skipped_examples": dict(examples),
    }
    with open(os.path.join(tmp, records.MANIFEST), "w") as f:
      json.dump(summary, f, indent=1)
  return summary
