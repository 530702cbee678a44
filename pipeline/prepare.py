"""`capjax prepare`: any caption source into ArrayRecord shards.

`open_source` turns a source name into a Grain source (see sources.py): a
prepared folder, `tfds:NAME`, `hf:FOLDER`, a COCO caption JSON, the Karpathy
split JSON, or a CSV/JSON/JSONL table. Every image is decoded once, in
parallel worker processes, so damaged files are found here rather than in
the middle of a run; those are skipped, counted and reported by reason.
Optionally images are shrunk (shorter side N, re-encoded as JPEG) so that
long runs stop paying full-size decoding every epoch. The output is written
to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
from typing import Any

import cv2
import simplejpeg

from pipeline import atomic, records, sources, transforms
from pipeline.sources import SourceError  # noqa: F401  (part of this module's surface)


def _kind(path: str) -> str:
  """coco, karpathy or table, from the file's name and first bytes."""
  if not path.endswith(".json"):
    return "table"
  with open(path) as f:
    head = f.read(1 << 16)
  if not head.lstrip().startswith("{"):
    return "table"
  return "karpathy" if '"sentences"' in head else "coco"


def open_source(spec: str, images: str | None = None, split: str | None = None,
                image_column: str = "image", caption_column: str = "caption",
                data_dir: str | None = None, image_key: str = "image",
                captions_key: str = "captions/text", id_key: str = "image/id"):
  """A Grain source for `spec`:

  - a folder written by `capjax prepare`;
  - `tfds:NAME` (`split`, default train; `data_dir`; the feature keys);
  - `hf:FOLDER`, a `datasets` Dataset saved to disk (`split`; the columns);
  - a COCO caption JSON (`images`: its image folder, default the JSON's);
  - the Karpathy `dataset_coco.json` (`images`: the COCO root holding
    train2014/ and val2014/; `split`: e.g. "train+restval", default train);
  - a CSV, JSON or JSONL table (the columns; paths relative to the table).
  """
  if spec.startswith("tfds:"):
    return sources.TfdsSource(spec[5:], split or "train", data_dir or None, image_key,
                              captions_key, id_key)
  if spec.startswith("hf:"):
    return sources.HFDatasetSource(spec[3:], split, image_column, caption_column)
  if os.path.isdir(spec):
    return records.PreparedSource(spec)
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"{spec}: no such file or directory")
  if not spec.endswith((".json", ".jsonl", ".csv")):
    raise SourceError(f"{spec}: expected a prepared folder, tfds:NAME, hf:FOLDER, or a "
                      ".json, .jsonl or .csv file")
  kind = _kind(spec)
  if kind == "table":
    return sources.table(spec, image_column, caption_column)
  root = images or os.path.dirname(os.path.abspath(spec))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--images {root}: no such directory")
  if kind == "karpathy":
    return sources.karpathy(spec, root, (split or "train").split("+"))
  return sources.coco(spec, root)


def open_split(data_cfg, which: str):
  """The config's `data.train` or `data.eval` source, with `data.source`'s
  options and the split `data.train_split` / `data.eval_split`."""
  o = data_cfg.source
  return open_source(data_cfg[which], o.images or None, data_cfg[f"{which}_split"],
                     o.image_column, o.caption_column, o.data_dir or None, o.image_key,
                     o.captions_key, o.id_key)


def ids_and_captions(source) -> list[tuple[str, list[str]]]:
  """Every record's id and captions, without reading images where the source can."""
  if isinstance(source, sources.FileSource):
    return [(record_id, caps) for record_id, _, caps in source.items]
  return [(r["id"], r["captions"]) for r in (source[i] for i in range(len(source)))]


_worker: dict[str, Any] = {}


def _init(source, resize_shorter: int, quality: int) -> None:
  _worker.update(source=source, resize_shorter=resize_shorter, quality=quality)


def _load(index: int) -> tuple[bytes | None, str | None, int, str]:
  """(the encoded record or None, the reason it is skipped, captions, where)."""
  rec = _worker["source"][index]
  where = rec.get("path") or f"record {rec['id']}"
  if rec.get("error"):
    return None, rec["error"], 0, where
  if not rec["captions"]:
    return None, "no captions", 0, where
  try:
    img = transforms.decode_image(rec["image"])  # all of it: truncation shows only here
  except transforms.BadImage as e:
    return None, str(e), 0, where
  data = rec["image"]
  n = _worker["resize_shorter"]
  if n and min(img.shape[:2]) > n:  # upright (EXIF applied) and smaller, as a JPEG
    h, w = img.shape[:2]
    scale = n / min(h, w)
    img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                     interpolation=cv2.INTER_AREA)
    data = simplejpeg.encode_jpeg(img, quality=_worker["quality"], colorspace="RGB")
  return records.encode_record(rec["id"], data, rec["captions"]), None, len(rec["captions"]), where


def prepare(source, out_dir: str, num_shards: int = 8, workers: int | None = None,
            resize_shorter: int = 0, jpeg_quality: int = 90) -> dict:
  """Writes `source`'s records as shards under `out_dir`; returns the summary
  (also saved as the manifest)."""
  if not 1 <= jpeg_quality <= 100:
    raise ValueError(f"--jpeg-quality {jpeg_quality}: not in 1..100")
  with atomic.folder(out_dir) as tmp:
    kept, skipped = [], collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(workers or os.cpu_count(), initializer=_init,
                  initargs=(source, resize_shorter, jpeg_quality)) as pool:
      for data, reason, n, where in pool.imap(_load, range(len(source)), chunksize=32):
        if data is None:
          skipped[reason] += 1
          if len(examples[reason]) < 3:
            examples[reason].append(where)
        else:
          kept.append((data, n))
    num_shards = max(1, min(num_shards, len(kept)))
    # Contiguous shards keep the source's order: record k is the k-th kept.
    bounds = [len(kept) * s // num_shards for s in range(num_shards + 1)]
    for s in range(num_shards):
      records.write_shard(records.shard_path(tmp, s, num_shards),
                          [d for d, _ in kept[bounds[s]:bounds[s + 1]]])
    summary = {
        "source": repr(source), "records": len(kept), "captions": sum(n for _, n in kept),
        "shards": num_shards, "skipped": dict(skipped), "skipped_examples": dict(examples),
        "resize_shorter": resize_shorter,
    }
    with open(os.path.join(tmp, records.MANIFEST), "w") as f:
      json.dump(summary, f, indent=1)
  return summary
