"""capjax's prepared format: ArrayRecord shards of msgpack records.

A record is `{"id": str, "image": bytes, "captions": [str, ...]}`: one image
with all of its captions, the image's encoded bytes as they were on disk.
A prepared folder holds `data-XXXXX-of-YYYYY.array_record` shards and a
`manifest.json` with the counts `prepare` reported, written last: a folder
without it is never read. It may be in a bucket: ArrayRecord reads `gs://`
itself (ranged reads, through google-cloud-cpp); an `s3://` folder, which it
cannot read, is copied into a local cache first (`fs.cached`).
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
from array_record.python import array_record_data_source, array_record_module

from pipeline import data_cache, fs

MANIFEST = "manifest.json"
WORK = ".prepare"  # a prepare's plan, per-shard counts and files being written


def encode_record(record_id: str, image: bytes, captions: list[str]) -> bytes:
  return msgpack.packb({"id": record_id, "image": image, "captions": list(captions)},
                       use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
  return msgpack.unpackb(data, raw=False)


def shard_path(folder: str, index: int, count: int) -> str:
  return fs.join(folder, f"data-{index:05d}-of-{count:05d}.array_record")


def is_shard(name: str) -> bool:
  return name.startswith("data-") and name.endswith(".array_record")


def shard_writer(path: str):
  """An ArrayRecord writer (`write(bytes)`, `close()`) for a shard at `path`."""
  # group_size:1 keeps random access to one record cheap; images do not compress.
  return array_record_module.ArrayRecordWriter(path, "group_size:1,uncompressed")


class PreparedSource:
  """A Grain random-access source over a folder written by `capjax prepare`."""

  def __init__(self, folder: str):
    self.folder = fs.absolute(folder)
    manifest = fs.join(self.folder, MANIFEST)
    if not fs.isfile(manifest):
      unfinished = fs.isdir(fs.join(self.folder, ".prepare"))
      raise FileNotFoundError(
          f"{folder}: not a prepared dataset (no {MANIFEST}); " +
          ("its `capjax prepare` did not finish: run it again to complete it" if unfinished
           else "run `capjax prepare` first"))
    self.manifest = json.loads(fs.read_text(manifest))
    names = [n for n in fs.listdir(self.folder) if is_shard(n)]
    if len(names) != self.manifest["shards"]:
      raise ValueError(f"{folder}: {len(names)} shards there, the manifest "
                       f"names {self.manifest['shards']}")
    root = (data_cache.cached(self.folder, names, "data") if fs.scheme(folder) == "s3"
            else self.folder)
    self.paths = [fs.join(root, n) for n in names]
    self._source = None

  def _reader(self):
    # Opened lazily, so the source pickles cheaply into Grain's worker processes.
    if self._source is None:
      self._source = array_record_data_source.ArrayRecordDataSource(self.paths)
    return self._source

  def __len__(self) -> int:
    return int(self.manifest["records"])

  def __getitem__(self, index: int) -> dict[str, Any]:
    return decode_record(self._reader()[index])

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __repr__(self) -> str:  # Grain compares it when restoring iterator state.
    return f"PreparedSource({self.folder!r}, records={len(self)})"
