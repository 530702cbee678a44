"""`capjax eval`: caption every image of a split and score the captions.

Writes `eval_predictions.jsonl` and `eval_metrics.json` into the run
directory (each written whole, then renamed into place) and prints samples.
"""

from __future__ import annotations

import collections
import json
import os
import time
from typing import Any, Sequence

from pipeline import atomic, records, synthetic
from trainer import caption_metrics
from trainer.inference import TrainedCaptioner


def most_frequent_caption(source: records.PreparedSource) -> str:
  counts = collections.Counter(c for i in range(len(source)) for c in source[i]["captions"])
  return counts.most_common(1)[0][0]


def evaluate(checkpoint_path: str, split_dir: str | None, out_dir: str | None,
             overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Scores a split (default: the config's `data.eval`); writes into `out_dir`
  (default: the run directory)."""
  model = TrainedCaptioner(checkpoint_path, overrides)
  split_dir = split_dir or model.cfg.data.eval
  out_dir = out_dir or model.workdir
  source = records.PreparedSource(split_dir)
  bs = model.cfg.eval.batch_size
  t0 = time.time()
  ids, refs, preds = [], [], []

  def batches():
    for start in range(0, len(source), bs):
      recs = [source[i] for i in range(start, min(start + bs, len(source)))]
      ids.extend(r["id"] for r in recs)
      refs.extend(r["captions"] for r in recs)
      yield [r["image"] for r in recs]

  for captions, _ in model.caption_batches(batches()):
    preds.extend(captions)
  seconds = time.time() - t0
  metrics: dict[str, Any] = caption_metrics.score(preds, refs)
  if os.path.isdir(model.cfg.data.train):
    baseline = most_frequent_caption(records.PreparedSource(model.cfg.data.train))
    metrics["baseline_caption"] = baseline
    metrics["baseline_cider"] = caption_metrics.score([baseline] * len(refs), refs)["cider"]
  if model.cfg.eval.content_accuracy:
    metrics["content_accuracy"] = synthetic.content_accuracy(preds, refs)
  metrics.update(step=model.step, images=len(preds), seconds=round(seconds, 2),
                 split=os.path.abspath(split_dir))
  os.makedirs(out_dir, exist_ok=True)
  atomic.write_text(os.path.join(out_dir, "eval_predictions.jsonl"), "".join(
      json.dumps({"id": i, "caption": p, "references": r}) + "\n"
      for i, p, r in zip(ids, preds, refs)))
  atomic.write_text(os.path.join(out_dir, "eval_metrics.json"), json.dumps(metrics, indent=1) + "\n")
  metrics["samples"] = [{"id": i, "caption": p, "references": r}
                        for i, p, r in list(zip(ids, preds, refs))[:model.cfg.eval.num_samples]]
  return metrics
