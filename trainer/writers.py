"""Metric output: TensorBoard event files (CLU's writer, where CLU and
TensorFlow import) plus `metrics.jsonl`, one JSON object per line with `step`
and the scalars of that step.

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


class JsonlWriter:
  """metrics.jsonl: a row of scalars per step, appended; rows past the step
  resumed from are dropped first (they are logged again)."""

  def __init__(self, path: str, resume_step: int):
    if os.path.exists(path):
      with open(path) as f:
        kept = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= resume_step]
      fs.write_text(path, "".join(kept))
    self._file = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    pass

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class _Uploads:
  """Last of the writers: after the others have flushed, their files to the bucket."""

  def __init__(self, stage: fs.Stage):
    self._stage = stage

  def write_scalars(self, step, scalars) -> None:
    pass

  def write_texts(self, step, texts) -> None:
    pass

  def flush(self) -> None:
    for rel in OUTPUTS:
      self._stage.push(rel)

  def close(self) -> None:
    self.flush()


class Writers:
  """Each call to every writer, in order."""

  def __init__(self, writers: list):
    self.writers = writers

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for w in self.writers:
      w.write_texts(step, texts)

  def flush(self) -> None:
    for w in self.writers:
      w.flush()

  def close(self) -> None:
    for w in self.writers:
      w.close()


def summary_writer(folder: str):
  """CLU's TensorBoard writer, or None with one line saying why where CLU or
  TensorFlow cannot be imported (a GPU image without them): metrics.jsonl
  then holds every scalar."""
  try:
    from clu import metric_writers  # imports TensorFlow: keep it off import paths
  except ImportError as e:
    print(f"TensorBoard summaries off ({e}): every scalar goes to metrics.jsonl", flush=True)
    return None
  return metric_writers.SummaryWriter(folder)


def create_writer(workdir: str, resume_step: int = 0, stage: fs.Stage | None = None) -> Writers:
  """TensorBoard summaries and metrics.jsonl (process 0; other processes
  write nothing). Neither keeps anything past `resume_step`: a run killed
  after its last checkpoint logs those steps again. `stage`: the run's (one
  is made)."""
  if jax.process_index() != 0:
    return Writers([])
  stage = stage or fs.Stage(workdir)
  fs.makedirs(workdir)
  tensorboard, jsonl = (stage.pull(rel) for rel in OUTPUTS)
  trim_events(tensorboard, resume_step)
  summaries = summary_writer(tensorboard)
  writers = [w for w in (summaries, JsonlWriter(jsonl, resume_step)) if w is not None]
  if stage.remote:
    writers.append(_Uploads(stage))
    writers[-1].flush()  # the trimmed files replace the interrupted run's
  return Writers(writers)


OUTPUTS = ("tensorboard", "metrics.jsonl")  # WORKDIR-relative
