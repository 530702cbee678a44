"""Metric output: CLU writers (TensorBoard event files) plus `metrics.jsonl`,
one JSON object per line with `step` and the scalars of that step.

Only process 0 writes; the others get a writer that does nothing. A resumed
run first drops what the interrupted one logged past its checkpoint, from
both, so every reader sees each step once.

For a run directory in a bucket both are written in the process's local
stage and uploaded whole at each flush (the train loop flushes with each
checkpoint and at the end); TensorBoard reads them from the bucket.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from pipeline import fs


def _plain(v: Any) -> float:
  return float(np.asarray(v))


def _records(f) -> Iterator[tuple[bytes, int]]:
  """An event file's TFRecords, whole (length, its CRC, the Event, its CRC),
  with each Event's step; a record cut short (a killed writer) ends it."""
  from tensorboard.compat.proto import event_pb2

  while len(head := f.read(12)) == 12:
    (n,) = struct.unpack("<Q", head[:8])
    rest = f.read(n + 4)
    if len(rest) < n + 4:
      return
    yield head + rest, event_pb2.Event.FromString(rest[:n]).step


def trim_events(folder: str, last_step: int) -> None:
  """Rewrites each TensorBoard event file in `folder` holding events past
  `last_step` (or a cut-short record) without them, whole or not at all.
  TensorBoard's own purge of such steps depends on the reader."""
  if not os.path.isdir(folder):
    return
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if name.startswith(".trim-"):  # left by a process killed while trimming
      os.remove(path)
      continue
    if "tfevents" not in name or not os.path.isfile(path):
      continue
    with open(path, "rb") as f:
      total, past = 0, False
      for record, step in _records(f):
        total += len(record)
        past = past or step > last_step
      whole = f.tell() == total  # else the file ends in a cut-short record
    if whole and not past:
      continue
    tmp = os.path.join(folder, f".trim-{os.getpid()}")  # no "tfevents": readers skip it
    with open(path, "rb") as f, open(tmp, "wb") as out:
      for record, step in _records(f):
        if step <= last_step:
          out.write(record)
    os.replace(tmp, path)


def create_writer(workdir: str, resume_step: int = 0, stage: fs.Stage | None = None):
  """A CLU MultiWriter: TensorBoard summaries and metrics.jsonl (process 0).
  Neither keeps anything past `resume_step`: a run killed after its last
  checkpoint logs those steps again. `stage`: the run's (one is made)."""
  from clu import metric_writers  # imports TensorFlow: keep it off import paths

  class JsonlWriter(metric_writers.MetricWriter):

    def __init__(self, path: str, resume_step: int):
      if os.path.exists(path):  # rows past the checkpoint resumed from are retrained
        with open(path) as f:
          kept = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= resume_step]
        fs.write_text(path, "".join(kept))
      self._file = open(path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
      row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
      self._file.write(json.dumps(row) + "\n")

    def write_summaries(self, step, values, metadata=None):
      pass

    def write_images(self, step, images):
      pass

    def write_videos(self, step, videos):
      pass

    def write_audios(self, step, audios, *, sample_rate):
      pass

    def write_texts(self, step, texts):
      pass

    def write_histograms(self, step, arrays, num_buckets=None):
      pass

    def write_hparams(self, hparams):
      pass

    def flush(self):
      self._file.flush()

    def close(self):
      self._file.close()

  class Uploads(JsonlWriter):
    """Last of the writers: after the others have flushed, their files to the bucket."""

    def __init__(self):
      pass

    def write_scalars(self, step, scalars):
      pass

    def flush(self):
      for rel in OUTPUTS:
        stage.push(rel)

    def close(self):
      self.flush()

  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  stage = stage or fs.Stage(workdir)
  fs.makedirs(workdir)
  tensorboard, jsonl = (stage.pull(rel) for rel in OUTPUTS)
  trim_events(tensorboard, resume_step)
  writers = [metric_writers.SummaryWriter(tensorboard), JsonlWriter(jsonl, resume_step)]
  if stage.remote:
    writers.append(Uploads())
    writers[-1].flush()  # the trimmed files replace the interrupted run's
  return metric_writers.MultiWriter(writers)


OUTPUTS = ("tensorboard", "metrics.jsonl")  # WORKDIR-relative
