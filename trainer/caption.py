"""`capjax caption`: a whole image set recaptioned, one Parquet file per unit
of input, beside the images.

The sources are read as `prepare` reads them (sources.open_source): a unit is
one input file of a sharded source (`00042.tar` becomes `OUT/00042.parquet`)
or a range of 10,000 records of any other (`OUT/records-000010000.parquet`).
Every host runs alone on its own devices and takes the units
`i % count == index` (`--process-index/--process-count`, or the environment
of SLURM, a TPU VM or a Kubernetes indexed Job), so hosts never wait for each
other and a lost host loses only its unfinished units. A unit's file is
written whole (a temporary file renamed; in a bucket, one object upload) and
records the unit's input key and the generation settings; the same command
again keeps every file whose key and settings match and writes the rest,
byte for byte what an uninterrupted run writes. Unusable images are skipped
and counted by reason in `OUT/.caption/NAME.json`, and `OUT/manifest.json`
gathers the counts of the units finished so far.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import zlib
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline import fs, images as images_lib, prepare, processes, sources
from pipeline.sources import SourceError, TruncatedInput
from trainer import generate

WORK = ".caption"  # per-unit counts and partial files
MANIFEST = "manifest.json"
EXAMPLES = 3  # records named for each reason they were skipped
COLUMNS = ("key", "caption", "logprob", "org_caption", "step")


def host_share(index: int | None, count: int | None) -> tuple[int, int]:
  """(this host's index, the host count): the flags, else the environment of
  SLURM, a TPU VM or a Kubernetes indexed Job (its index; the count from
  --process-count), else (0, 1)."""
  env = os.environ
  if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
    found = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
  elif "TPU_WORKER_ID" in env and env.get("TPU_WORKER_HOSTNAMES"):
    found = int(env["TPU_WORKER_ID"]), len(env["TPU_WORKER_HOSTNAMES"].split(","))
  elif "JOB_COMPLETION_INDEX" in env:
    found = int(env["JOB_COMPLETION_INDEX"]), None
    if count is None:
      raise ValueError("--process-count: needed in a Kubernetes indexed Job (JOB_COMPLETION_INDEX "
                       "is set): give its completions")
  else:
    found = None, None
  index = found[0] if index is None else index
  count = found[1] if count is None else count
  index, count = (0 if index is None else index), (1 if count is None else count)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"--process-index {index} --process-count {count}: need "
                     "0 <= index < count")
  return index, count


def unit_names(units: Sequence[Any]) -> list[str]:
  """Each unit's output name: its input file's, without the extension, or
  its first record's number; two units of one name are refused."""
  names = [sources.unit_name(unit) for unit in units]
  seen: dict[str, Any] = {}
  for name, unit in zip(names, units):
    if name in seen:
      raise SourceError(f"{seen[name].name} and {unit.name} would both be written as "
                        f"{name}.parquet: caption them into separate --out folders")
    seen[name] = unit
  return names


def _prefetch(items: Iterator[Any], waited: list[float], depth: int = 2) -> Iterator[Any]:
  """`items` made by a thread of its own, up to `depth` ahead: images are
  read and decoded while the devices generate. The seconds spent waiting for
  an item are added to `waited[0]`."""
  q: queue.Queue = queue.Queue(depth)
  done = object()
  stop = threading.Event()

  def work():
    try:
      for item in items:
        while not stop.is_set():
          try:
            q.put(item, timeout=0.5)
            break
          except queue.Full:
            pass
        if stop.is_set():
          return
    except BaseException as e:  # raised again in the consumer
      q.put(e)
      return
    q.put(done)

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while True:
      t = time.monotonic()
      item = q.get()
      waited[0] += time.monotonic() - t
      if item is done:
        break
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


class Job:
  """One host's share of a caption run."""

  def __init__(self, model: Any, out_dir: str, batch_size: int, settings: dict[str, Any],
               progress_every: float = 10.0, num_return: int = 0):
    self.model, self.out_dir, self.settings = model, out_dir, settings
    self.num_return = num_return  # > 0: also `captions` and `logprobs`, N each
    self.batch_size = batch_size
    self.every = progress_every
    self.work = fs.join(out_dir, WORK)
    # Partial files: beside the output, or for a bucket in local scratch.
    self.partial = fs.scratch() if fs.is_bucket(out_dir) else self.work
    os.makedirs(self.partial, exist_ok=True)
    for name in os.listdir(self.partial):  # partial files of this host's dead runs
      if ".tmp-" in name and processes.gone(name.split(".tmp-")[-1], ""):
        os.remove(os.path.join(self.partial, name))
    self.done = self.skipped = 0
    self.units_done = self.units_todo = 0
    self.waited = [0.0]  # seconds the devices waited for images
    self.t0 = self.last = time.monotonic()

  def _metadata(self, unit: Any) -> bytes:
    return json.dumps({"unit": unit.key, **self.settings}, sort_keys=True).encode()

  def finished(self, unit: Any, name: str) -> bool:
    """Whether the unit's file is there, for the same input and settings."""
    import pyarrow.parquet as pq
    path = fs.join(self.out_dir, name + ".parquet")
    if not fs.exists(fs.join(self.work, name + ".json")) or not fs.exists(path):
      return False
    with fs.open_read(path) as f:
      meta = pq.read_schema(f).metadata or {}
    return meta.get(b"capjax") == self._metadata(unit)

  def _batches(self, unit: Any, counts: dict[str, Any]) -> Iterator[tuple[list, list]]:
    """(records, decoded images) in batches; unusable records counted."""
    skipped, examples = counts["skipped"], counts["skipped_examples"]

    def skip(rec, reason):
      skipped[reason] = skipped.get(reason, 0) + 1
      if len(examples.setdefault(reason, [])) < EXAMPLES:
        examples[reason].append(rec.get("path") or f"record {rec.get('id')}")

    def decoded(pending):
      kept, imgs = [], []
      for rec, img in zip(pending, self.model.decode([r["image"] for r in pending])):
        if isinstance(img, images_lib.BadImage):
          skip(rec, str(img))
        else:
          kept.append(rec)
          imgs.append(img)
      return kept, imgs

    pending: list[dict[str, Any]] = []
    try:
      for work, rec in unit.read():
        counts["work"] = work / max(unit.size, 1)  # this unit's share read, for the ETA
        if rec.get("error"):
          skip(rec, rec["error"])
          continue
        pending.append(rec)
        if len(pending) == self.batch_size:
          yield decoded(pending)
          pending = []
    except TruncatedInput as e:
      counts["truncated"] = str(e)
    if pending:
      yield decoded(pending)

  def run(self, todo: Sequence[tuple[Any, str]]) -> Iterator[dict[str, Any]]:
    """Captions each (unit, name) into OUT/NAME.parquet, yielding its counts
    once its file is written. Images are read and decoded ahead, across
    units, while the devices generate; batches never span two units, so a
    unit's file does not depend on which units came before it."""
    def stream():
      for unit, name in todo:
        counts: dict[str, Any] = {"unit": unit.key, "name": unit.name, "captioned": 0,
                                  "skipped": {}, "skipped_examples": {}, "truncated": ""}
        for recs, imgs in self._batches(unit, counts):
          yield unit, name, counts, recs, imgs
        yield unit, name, counts, None, None  # the unit's end

    self.units_todo, self.units_done = len(todo), 0
    m, rows = self.model, self._empty_rows()
    for unit, name, counts, recs, imgs in _prefetch(stream(), self.waited):
      if recs is None:
        counts.pop("work", None)
        self.units_done += 1
        yield self._write(unit, name, counts, rows)
        rows = self._empty_rows()
        continue
      if recs:
        batch = np.zeros((self.batch_size, *imgs[0].shape), np.uint8)  # one compiled shape
        batch[:len(imgs)] = imgs
        seeds = np.zeros((self.batch_size,), np.uint32)  # each image's own draws, by its key
        seeds[:len(recs)] = [zlib.crc32(str(r["id"]).encode()) for r in recs]
        ids, logprob = m.generate_scored(batch, seeds)
        ids, logprob = ids[:len(recs)], logprob[:len(recs)]
        if self.num_return:  # [n, N, L]: the best first
          texts = generate.decode_text(m.tok, ids.reshape(-1, ids.shape[-1]), m.eos)
          n = self.num_return
          rows["captions"] += [texts[i * n:(i + 1) * n] for i in range(len(recs))]
          rows["logprobs"] += [[float(x) for x in row] for row in logprob]
          rows["caption"] += texts[::n]
          logprob = logprob[:, 0]
        else:
          rows["caption"] += generate.decode_text(m.tok, ids, m.eos)
        rows["logprob"] += [float(x) for x in logprob]
        rows["key"] += [str(r["id"]) for r in recs]
        rows["org_caption"] += [r["captions"][0] if r["captions"] else "" for r in recs]
        rows["step"] += [int(m.step)] * len(recs)
      self.done += len(recs)
      self._tick(counts)

  def _empty_rows(self) -> dict[str, list]:
    return {c: [] for c in COLUMNS + (("captions", "logprobs") if self.num_return else ())}

  def _write(self, unit: Any, name: str, counts: dict[str, Any], rows: dict[str, list]
             ) -> dict[str, Any]:
    """The unit's Parquet file, whole or not at all, then its counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"key": pa.array(rows["key"], pa.string()),
                      "caption": pa.array(rows["caption"], pa.string()),
                      "logprob": pa.array(rows["logprob"], pa.float32()),
                      "org_caption": pa.array(rows["org_caption"], pa.string()),
                      "step": pa.array(rows["step"], pa.int64()),
                      **({"captions": pa.array(rows["captions"], pa.list_(pa.string())),
                          "logprobs": pa.array(rows["logprobs"], pa.list_(pa.float32()))}
                         if self.num_return else {})})
    table = table.replace_schema_metadata({"capjax": self._metadata(unit)})
    counts["captioned"] = table.num_rows
    tmp = os.path.join(self.partial, f"{name}.parquet.tmp-{processes.owner()}")
    final = fs.join(self.out_dir, name + ".parquet")
    try:
      pq.write_table(table, tmp)
      if fs.is_bucket(final):
        fs.copy(tmp, final)  # one object upload: whole or not at all
      else:
        os.replace(tmp, final)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    fs.write_text(fs.join(self.work, name + ".json"), json.dumps(counts, indent=1))
    self.skipped += sum(counts["skipped"].values())
    return counts

  def _tick(self, counts, force: bool = False) -> None:
    skipped = self.skipped + sum(counts["skipped"].values())  # this unit's, so far
    if force or time.monotonic() - self.last >= self.every:
      elapsed = time.monotonic() - self.t0
      rate = (self.done + skipped) / max(elapsed, 1e-9)
      # the units' own measure (bytes of a tar, rows, records) read so far
      done = self.units_done + min(counts.get("work", 0.0), 1.0)
      left = self.units_todo - done
      eta = prepare.duration(elapsed * left / done) if done > 0 else "?"
      print(f"caption: {self.done:,} images captioned, {skipped:,} skipped, "
            f"{rate:,.1f} images/s; units {self.units_done} of {self.units_todo} here; "
            f"ETA {eta}", file=sys.stderr, flush=True)
      self.last = time.monotonic()


def write_manifest(out_dir: str, names: Sequence[str]) -> dict[str, Any]:
  """OUT/manifest.json from the counts of the units finished so far, in order."""
  units, captioned, skipped = [], 0, {}
  for name in names:
    path = fs.join(out_dir, WORK, name + ".json")
    if not fs.exists(path):
      continue
    c = json.loads(fs.read_text(path))
    units.append({"file": name + ".parquet", **c})
    captioned += c["captioned"]
    for reason, n in c["skipped"].items():
      skipped[reason] = skipped.get(reason, 0) + n
  manifest = {"units": len(names), "finished": len(units), "captioned": captioned,
              "skipped": skipped, "truncated": {u["name"]: u["truncated"]
                                                for u in units if u["truncated"]},
              "shards": units}
  fs.write_text(fs.join(out_dir, MANIFEST), json.dumps(manifest, indent=1))
  return manifest


def caption(checkpoint: str, specs: Sequence[str], out_dir: str, overrides: Sequence[str] = (),
            batch_size: int = 32, process_index: int | None = None,
            process_count: int | None = None, source_options: dict[str, Any] | None = None,
            progress_every: float = 10.0, sampling: tuple[int, float, float] | None = None,
            num_return: int = 1) -> dict[str, Any]:
  """Captions this host's share of the units of `specs` into `out_dir`;
  returns the manifest. `sampling` (seed, temperature, top_p): captions drawn,
  each image's from its key and the seed, the same on every run.
  `num_return` N > 1: also the columns `captions` and `logprobs`, the N best
  beams (or N draws), best first."""
  if num_return < 1:
    raise ValueError(f"--num-return {num_return}: must be at least 1")
  extra = num_return if num_return > 1 else 0
  from trainer.inference import TrainedCaptioner

  index, count = host_share(process_index, process_count)
  units = []
  for spec in specs:
    units += sources.units(sources.open_source(spec, **(source_options or {})), None)
  if not units:
    raise SourceError(f"{', '.join(specs)}: no records")
  names = unit_names(units)
  mine = [i for i in range(len(units)) if i % count == index]
  model = TrainedCaptioner(checkpoint, overrides, sampling, extra)
  devices = len(model.mesh.devices.flat)
  batch = -(-max(batch_size, 1) // devices) * devices
  e = model.cfg.eval
  settings = {"checkpoint_step": int(model.step), "num_beams": int(e.num_beams),
              "max_length": int(e.max_length),
              "no_repeat_ngram_size": int(e.no_repeat_ngram_size),
              "length_penalty": float(e.length_penalty), "early_stopping": str(e.early_stopping),
              "sampling": list(sampling) if sampling else None, "num_return": num_return}
  out_dir = fs.absolute(out_dir)
  fs.makedirs(out_dir)
  job = Job(model, out_dir, batch, settings, progress_every, extra)
  todo = [i for i in mine if not job.finished(units[i], names[i])]
  print(f"caption: host {index} of {count}: {len(mine)} of {len(units)} units, "
        f"{len(mine) - len(todo)} already written, kept", file=sys.stderr, flush=True)
  if todo:  # compiled before the clock starts: rates and waits are the work's
    t = time.monotonic()
    side = model.cfg.data.image_size
    model.generate_scored(np.zeros((batch, side, side, 3), np.uint8),
                          np.zeros((batch,), np.uint32))
    print(f"caption: decoding compiled in {time.monotonic() - t:.1f}s", file=sys.stderr,
          flush=True)
    job.t0 = job.last = time.monotonic()
  for i, counts in zip(todo, job.run([(units[i], names[i]) for i in todo])):
    write_manifest(out_dir, names)
    cut = ", truncated" if counts["truncated"] else ""
    print(f"caption: wrote {names[i]}.parquet ({counts['captioned']} captioned, "
          f"{sum(counts['skipped'].values())} skipped{cut})", file=sys.stderr, flush=True)
  manifest = write_manifest(out_dir, names)
  elapsed = time.monotonic() - job.t0
  print(f"caption: done, {job.done:,} images captioned and {job.skipped:,} skipped here in "
        f"{elapsed:,.1f}s ({job.done / max(elapsed, 1e-9):,.2f} images/s, waiting for images "
        f"{job.waited[0] / max(elapsed, 1e-9):.1%} of it); {manifest['finished']} of "
        f"{len(units)} units written", file=sys.stderr, flush=True)
  return manifest
