"""Metric output: CLU writers (TensorBoard event files) plus `metrics.jsonl`,
one JSON object per line with `step` and the scalars of that step.

Only process 0 writes; the others get a writer that does nothing.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from pipeline import atomic


def _plain(v: Any) -> float:
  return float(np.asarray(v))


def create_writer(workdir: str, resume_step: int = 0):
  """A CLU MultiWriter: TensorBoard summaries and metrics.jsonl (process 0).
  metrics.jsonl keeps no rows past `resume_step`: a run killed after its
  last checkpoint logs those steps again."""
  from clu import metric_writers  # imports TensorFlow: keep it off import paths

  class JsonlWriter(metric_writers.MetricWriter):

    def __init__(self, path: str, resume_step: int):
      if os.path.exists(path):  # rows past the checkpoint resumed from are retrained
        with open(path) as f:
          kept = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= resume_step]
        atomic.write_text(path, "".join(kept))
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

  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  os.makedirs(workdir, exist_ok=True)
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_step),
  ])
