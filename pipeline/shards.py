"""`prepare`'s unit of work, and the output folder it builds up.

Unit i of n (an input file, or a range of records: sources/base.py) becomes
`data-i-of-n.array_record`, streamed record by record into a temporary file
and renamed when complete (in a bucket, which has no rename: written in a
local scratch folder, uploaded as one object, then deleted); then its counts
go to `.prepare/data-i-of-n.json`.
The first thing written is `.prepare/plan.json` (the source and the
options), the last `manifest.json` (the counts of all shards, in order). A
prepare run again with the same plan keeps every shard whose counts are
written and whose input is unchanged, and writes the rest: whichever worker,
process or machine wrote a shard, its bytes depend on its input alone.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import cv2
import simplejpeg

from pipeline import fs, images, records
from pipeline.sources import SourceError, TruncatedInput

EXAMPLES = 3  # records named for each reason they were skipped


@dataclasses.dataclass(frozen=True)
class Options:
  resize_shorter: int = 0  # shrink images whose shorter side is larger (0: keep)
  jpeg_quality: int = 90  # of shrunk images


def encode(rec: dict[str, Any], options: Options) -> tuple[bytes | None, str | None, int]:
  """(the encoded record or None, why it is skipped, its captions)."""
  if rec.get("error"):
    return None, rec["error"], 0
  if not rec["captions"]:
    return None, "no captions", 0
  try:
    img = images.decode_image(rec["image"])  # all of it: truncation shows only here
  except images.BadImage as e:
    return None, str(e), 0
  data = rec["image"]
  n = options.resize_shorter
  if n and min(img.shape[:2]) > n:  # upright (EXIF applied) and smaller, as a JPEG
    h, w = img.shape[:2]
    scale = n / min(h, w)
    img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                     interpolation=cv2.INTER_AREA)
    data = simplejpeg.encode_jpeg(img, quality=options.jpeg_quality, colorspace="RGB")
  return records.encode_record(rec["id"], data, rec["captions"]), None, len(rec["captions"])


def _counts_path(out_dir: str, index: int, count: int) -> str:
  name = os.path.basename(records.shard_path(out_dir, index, count))
  return fs.join(out_dir, records.WORK, name.replace(".array_record", ".json"))


Report = Callable[[int, int, int], None]  # (work done, records kept, records skipped)


def write_shard(out_dir: str, index: int, count: int, unit: Any, options: Options,
                report: Report | None = None, report_every: float = 0.5) -> dict[str, Any]:
  """Writes `unit`, number `index` of `count`, as its shard; returns (and saves) its counts."""
  final = records.shard_path(out_dir, index, count)
  tmp = os.path.join(fs.scratch() if fs.is_bucket(out_dir)
                     else os.path.join(out_dir, records.WORK),
                     f"{os.path.basename(final)}.tmp-{os.getpid()}")
  counts: dict[str, Any] = {"unit": unit.key, "name": unit.name, "records": 0, "captions": 0,
                            "skipped": {}, "skipped_examples": {}, "truncated": {}}
  skipped: collections.Counter = collections.Counter()
  examples: dict[str, list[str]] = collections.defaultdict(list)
  writer = records.shard_writer(tmp)
  last = time.monotonic()
  try:
    try:
      for work, rec in unit.read():
        data, reason, captions = encode(rec, options)
        if data is None:
          skipped[reason] += 1
          if len(examples[reason]) < EXAMPLES:
            examples[reason].append(rec.get("path") or f"record {rec.get('id')}")
        else:
          writer.write(data)
          counts["records"] += 1
          counts["captions"] += captions
        if report is not None and time.monotonic() - last > report_every:
          report(work, counts["records"], sum(skipped.values()))
          last = time.monotonic()
    except TruncatedInput as e:
      counts["truncated"][unit.name] = str(e)
    writer.close()
    if fs.is_bucket(out_dir):
      fs.copy(tmp, final)
      os.remove(tmp)
    else:
      os.replace(tmp, final)
  except BaseException:
    writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  counts["skipped"], counts["skipped_examples"] = dict(skipped), dict(examples)
  fs.write_text(_counts_path(out_dir, index, count), json.dumps(counts, indent=1))
  if report is not None:
    report(unit.size, counts["records"], sum(skipped.values()))
  return counts


def _ours(out_dir: str) -> bool:
  """Holds nothing but what prepare writes."""
  return all(name in (records.WORK, records.MANIFEST) or records.is_shard(name)
             for name in fs.listdir(out_dir))


def _clear(out_dir: str) -> None:
  fs.remove(fs.join(out_dir, records.MANIFEST))  # first: the folder is no longer complete
  for name in fs.listdir(out_dir):
    if records.is_shard(name):
      fs.remove(fs.join(out_dir, name))
  fs.rmtree(fs.join(out_dir, records.WORK))


def plan(source: Any, units: Sequence[Any], options: Options) -> dict[str, Any]:
  return {"source": repr(source), "key": getattr(source, "key", ""), "shards": len(units),
          **dataclasses.asdict(options)}


def start(out_dir: str, the_plan: dict[str, Any], units: Sequence[Any]) -> list[int]:
  """Readies `out_dir` for `the_plan`; returns the shards already written."""
  if fs.isdir(out_dir):
    plan_file = fs.join(out_dir, records.WORK, "plan.json")
    old = json.loads(fs.read_text(plan_file)) if fs.isfile(plan_file) else None
    if old != the_plan:
      if not _ours(out_dir):
        raise SourceError(f"--out {out_dir}: exists and holds files prepare did not write; "
                          "give a new or empty folder")
      _clear(out_dir)
  elif fs.exists(out_dir):
    raise SourceError(f"--out {out_dir}: exists and is not a folder")
  fs.makedirs(fs.join(out_dir, records.WORK))
  fs.write_text(fs.join(out_dir, records.WORK, "plan.json"), json.dumps(the_plan, indent=1))
  for name in fs.listdir(fs.join(out_dir, records.WORK)):
    if ".tmp-" in name:  # a killed run's
      fs.remove(fs.join(out_dir, records.WORK, name))
  present = set(fs.listdir(out_dir))
  done = []
  for i, unit in enumerate(units):
    saved = read_counts(out_dir, i, len(units))
    if (saved is not None and saved["unit"] == unit.key
        and os.path.basename(records.shard_path(out_dir, i, len(units))) in present):
      done.append(i)
  if len(done) < len(units):
    fs.remove(fs.join(out_dir, records.MANIFEST))  # complete again only at the end
  return done


def read_counts(out_dir: str, index: int, count: int) -> dict[str, Any] | None:
  path = _counts_path(out_dir, index, count)
  return json.loads(fs.read_text(path)) if fs.isfile(path) else None


def finish(out_dir: str, the_plan: dict[str, Any]) -> dict[str, Any]:
  """Writes the manifest from every shard's counts, in shard order; returns it."""
  n = the_plan["shards"]
  per_shard = [read_counts(out_dir, i, n) for i in range(n)]
  missing = [i for i, c in enumerate(per_shard) if c is None]
  if missing:
    raise RuntimeError(f"{out_dir}: shards {missing[:5]} were not written")
  skipped: collections.Counter = collections.Counter()
  examples: dict[str, list[str]] = {}
  truncated: dict[str, str] = {}
  for c in per_shard:
    skipped.update(c["skipped"])
    for reason, where in c["skipped_examples"].items():
      examples[reason] = (examples.get(reason, []) + where)[:EXAMPLES]
    truncated.update(c["truncated"])
  summary = {
      "source": the_plan["source"], "records": sum(c["records"] for c in per_shard),
      "captions": sum(c["captions"] for c in per_shard), "shards": n,
      "shard_records": [c["records"] for c in per_shard],
      "skipped": dict(skipped), "skipped_examples": examples, "truncated": truncated,
      "resize_shorter": the_plan["resize_shorter"], "jpeg_quality": the_plan["jpeg_quality"],
  }
  fs.write_text(fs.join(out_dir, records.MANIFEST), json.dumps(summary, indent=1))
  return summary
