"""Caption sources, each a Grain random-access source with a stable `repr`.

Every source yields records `{"id": str, "image": bytes, "captions": [str]}`:
one image, its encoded bytes as stored, and all of its captions. A record that
cannot be read carries `"error"` (the reason) instead of failing: the loader
and `prepare` count it, skip it or stop on it, as their policy says.

  PreparedSource  capjax's own ArrayRecord shards (`capjax prepare`), records.py
  FileSource      images on disk listed by a COCO caption file, a CSV/JSON/JSONL
                  table, or the Karpathy-split `dataset_coco.json`
  TfdsSource      any TFDS dataset through `tfds.data_source` (ArrayRecord),
                  `coco_captions` among them
  HFDatasetSource a Hugging Face `datasets` Dataset saved on disk
"""

from __future__ import annotations

import collections
import csv
import json
import os
from typing import Any, Iterable, Sequence

Item = tuple[str, str, list[str]]  # (record id, image path, captions)


class SourceError(ValueError):
  """Bad input, with a message that names the file and the record."""


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
  except (OSError, TypeError) as e:  # TypeError: no path at all
    record["error"] = f"unreadable file ({getattr(e, 'strerror', None) or e})"
  return record


class FileSource:
  """Records whose images are files on disk, read when accessed."""

  def __init__(self, items: Sequence[Item], description: str):
    self.items = list(items)
    self.description = description

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return file_record(*self.items[index])

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
  return FileSource(items, f"coco {os.path.abspath(annotation_file)!r}")


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
  return FileSource(items, f"karpathy {os.path.abspath(path)!r} {'+'.join(splits)}")


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


def _field(example: dict, key: str):
  """`key` as a feature name, or a path into nested features ("captions/text")."""
  if key in example:
    return example[key]
  value = example
  for part in key.split("/"):
    value = value[part]
  return value


def _text(value) -> str:
  return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()


class TfdsSource:
  """A TFDS dataset prepared as ArrayRecord (e.g. `tfds build coco_captions
  --file_format=array_record`), read with `tfds.data_source`, images kept
  encoded. The feature names default to `coco_captions`'s."""

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               image_key: str = "image", captions_key: str = "captions/text",
               id_key: str = "image/id"):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.keys = (image_key, captions_key, id_key)
    self._source = None
    self._len = len(self._reader())

  def _reader(self):
    if self._source is None:
      import tensorflow_datasets as tfds

      try:
        self._source = tfds.data_source(
            self.name, split=self.split, data_dir=self.data_dir, download=False,
            decoders={self.keys[0]: tfds.decode.SkipDecoding()})
      except Exception as e:
        raise SourceError(f"tfds:{self.name} split {self.split!r}: cannot open "
                          f"({str(e).strip().splitlines()[0][:200]})") from None
    return self._source

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._reader()[index]
    image_key, captions_key, id_key = self.keys
    try:
      caps = _field(example, captions_key)
      caps = [caps] if isinstance(caps, (str, bytes)) else list(caps)
      return {"id": _text(_field(example, id_key)), "image": bytes(_field(example, image_key)),
              "captions": [_text(c) for c in caps]}
    except KeyError as e:
      raise SourceError(f"tfds:{self.name}: record {index} has no feature {e} "
                        f"(it has {sorted(example)})") from None

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __repr__(self) -> str:
    return (f"TfdsSource({self.name!r}, split={self.split!r}, keys={self.keys}, "
            f"records={len(self)})")


class HFDatasetSource:
  """A Hugging Face `datasets` Dataset saved with `save_to_disk` (a
  DatasetDict's split chosen by `split`): an image column (an `Image`
  feature, or file paths) and a caption column (a string or a list)."""

  def __init__(self, path: str, split: str | None = None, image_column: str = "image",
               caption_column: str = "caption"):
    self.path, self.split = os.path.abspath(path), split
    self.columns = (image_column, caption_column)
    self._ds = None
    ds = self._dataset()
    for column in self.columns:
      if column not in ds.column_names:
        raise SourceError(f"{path}: no column {column!r} (it has {ds.column_names})")
    self._len = len(ds)

  def _dataset(self):
    if self._ds is None:
      import datasets

      ds = datasets.load_from_disk(self.path)
      if isinstance(ds, datasets.DatasetDict):
        if self.split not in ds:
          raise SourceError(f"{self.path}: no split {self.split!r} (it has {sorted(ds)})")
        ds = ds[self.split]
      image_column = self.columns[0]
      if isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
      self._ds = ds
    return self._ds

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    row = self._dataset()[index]
    image, caps = row[self.columns[0]], row[self.columns[1]]
    caps = [str(c).strip() for c in ([caps] if isinstance(caps, str) else caps)]
    if isinstance(image, dict) and image.get("bytes"):
      return {"id": str(index), "image": image["bytes"], "captions": caps}
    return file_record(str(index), image.get("path") if isinstance(image, dict) else image, caps)

  def __getstate__(self):
    return {**self.__dict__, "_ds": None}

  def __repr__(self) -> str:
    return (f"HFDatasetSource({self.path!r}, split={self.split!r}, columns={self.columns}, "
            f"records={len(self)})")
