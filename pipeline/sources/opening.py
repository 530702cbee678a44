"""A source by its spelling: `data.train`, `data.eval`, a mixture's entries,
`capjax prepare`'s SOURCE and `eval --split` name sources as strings, and
`open_source` tells which kind each names and opens it."""

from __future__ import annotations

import os

from pipeline import fs, records
from pipeline.sources import files
from pipeline.sources.base import SourceError
from pipeline.sources.hf import HFDatasetSource
from pipeline.sources.parquet import ParquetSource
from pipeline.sources.tfds import TfdsSource
from pipeline.sources.webdataset import WebDatasetSource


def _kind(path: str) -> str:
  """coco, karpathy or table, from the file's name and first bytes."""
  if not path.endswith(".json"):
    return "table"
  with open(path) as f:
    head = f.read(1 << 16)
  if not head.lstrip().startswith("{"):
    return "table"
  return "karpathy" if '"sentences"' in head else "coco"


def _tables(spec: str, suffix: str) -> bool:
  """Names files with `suffix`: one, a glob or brace pattern, or a folder of
  them (local or in a bucket)."""
  if spec.endswith(suffix) or (suffix + "}") in spec:
    return True
  return fs.isdir(spec) and any(f.endswith(suffix) for f in fs.listdir(spec))


def open_source(spec: str, images: str | None = None, split: str | None = None,
                image_column: str | None = None, caption_column: str | None = None,
                data_dir: str | None = None, image_key: str = "image",
                captions_key: str = "captions/text", id_key: str = "image/id",
                id_column: str | None = None):
  """The source `spec` names:

  - a folder written by `capjax prepare` (local, `gs://` or `s3://`);
  - WebDataset tar shards (img2dataset's layout): a folder of them, a glob or
    a brace pattern (`cc3m/{00000..00331}.tar`); `caption_column` a field of
    each sample's .json (default: its .txt);
  - Parquet files with image bytes (img2dataset's `jpg`/`txt`, or HF's Image
    struct): a folder, a glob or a pattern; the columns (default: found);
  - `tfds:NAME` (`split`, default train; `data_dir`; the feature keys);
  - `hf:NAME`: a `datasets` folder (`save_to_disk`, Parquet, imagefolder) or a
    Hub repository in the local cache (`split`; the columns);
  - a COCO caption JSON (`images`: its image folder, default the JSON's);
  - the Karpathy `dataset_coco.json` (`images`: the COCO root holding
    train2014/ and val2014/; `split`: e.g. "train+restval", default train);
  - a CSV, JSON or JSONL table (the columns; paths relative to the table).
  """
  if spec.startswith("tfds:"):
    return TfdsSource(spec[5:], split or "train", data_dir or None, image_key,
                              captions_key, id_key)
  if spec.startswith("hf:"):
    return HFDatasetSource(spec[3:], split, image_column or "image",
                                   caption_column or "caption")
  if fs.is_bucket(spec):  # a prepared folder, WebDataset tars or Parquet files
    if _tables(spec, ".tar"):
      return WebDatasetSource(spec, caption_column)
    if _tables(spec, ".parquet"):
      return ParquetSource(spec, image_column, caption_column, id_column)
    return records.PreparedSource(spec)
  if os.path.isdir(spec) and (os.path.exists(os.path.join(spec, records.MANIFEST))
                              or os.path.isdir(os.path.join(spec, records.WORK))):
    return records.PreparedSource(spec)
  if _tables(spec, ".tar"):
    return WebDatasetSource(spec, caption_column)
  if _tables(spec, ".parquet"):
    return ParquetSource(spec, image_column, caption_column, id_column)
  if os.path.isdir(spec):
    return records.PreparedSource(spec)  # says it is not one
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"{spec}: no such file or directory")
  if not spec.endswith((".json", ".jsonl", ".csv")):
    raise SourceError(f"{spec}: expected a prepared folder, .tar or .parquet files, tfds:NAME, "
                      "hf:NAME, or a .json, .jsonl or .csv file")
  kind = _kind(spec)
  if kind == "table":
    return files.table(spec, image_column or "image", caption_column or "caption")
  root = images or os.path.dirname(os.path.abspath(spec))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--images {root}: no such directory")
  if kind == "karpathy":
    return files.karpathy(spec, root, (split or "train").split("+"))
  return files.coco(spec, root)


def open_split(data_cfg, which: str, spec: str | None = None):
  """The config's `data.train` or `data.eval` source (or `spec`, one of a
  mixture's), with `data.source`'s options and the split `data.train_split`
  / `data.eval_split`."""
  o = data_cfg.source
  source = open_source(spec or data_cfg[which], o.images or None, data_cfg[f"{which}_split"],
                       o.image_column, o.caption_column, o.data_dir or None, o.image_key,
                       o.captions_key, o.id_key)
  if not hasattr(source, "__getitem__"):
    raise SourceError(f"data.{which}: {source!r} is read file by file; run `capjax prepare` "
                      "on it and name the prepared folder")
  return source


def ids_and_captions(source) -> list[tuple[str, list[str]]]:
  """Every record's id and captions, without reading images where the source can."""
  if isinstance(source, files.FileSource):
    return [(record_id, caps) for record_id, _, caps in source.items]
  return [(r["id"], r["captions"]) for r in (source[i] for i in range(len(source)))]
