"""`capjax eval`: caption every image of a split and score the captions.

Writes `eval_predictions.jsonl` and `eval_metrics.json` into the run
directory (each written whole, then renamed into place) and prints samples.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from typing import Any, Sequence

import jax
import numpy as np

from pipeline import atomic, prepare, synthetic, transforms
from trainer import caption_metrics, generate
from trainer.inference import TrainedCaptioner


def most_frequent_caption(source) -> str:
  counts = collections.Counter(c for _, caps in prepare.ids_and_captions(source) for c in caps)
  return counts.most_common(1)[0][0]


def evaluate(checkpoint_path: str, split: str | None, out_dir: str | None,
             overrides: Sequence[str] = ()) -> dict[str, Any] | None:
  """Scores a split (default: the config's `data.eval`); process 0 writes into
  `out_dir` (default: the run directory) and returns the metrics, the other
  processes None.

  Every record is captioned exactly once over all processes: each takes a
  contiguous share, and the last batches are padded (the padding masked out),
  never dropped. A record whose image cannot be used is skipped and counted
  (`data.bad_records="skip"`) or stops the evaluation (`"fail"`).
  """
  from jax.experimental import multihost_utils

  model = TrainedCaptioner(checkpoint_path, overrides)
  cfg = model.cfg
  source = prepare.open_source(split) if split else prepare.open_split(cfg.data, "eval")
  n, procs, me = len(source), jax.process_count(), jax.process_index()
  local_bs = model.local_batch_size(cfg.eval.batch_size)
  bounds = [n * q // procs for q in range(procs + 1)]
  num_batches = -(-max(b - a for a, b in zip(bounds, bounds[1:])) // local_bs)
  size = cfg.data.image_size
  t0 = time.time()
  tokens: dict[int, list[int]] = {}
  skipped: dict[int, str] = {}
  for b in range(num_batches):
    start = bounds[me] + b * local_bs
    mine = range(start, min(start + local_bs, bounds[me + 1]))
    recs = [source[i] for i in mine]
    images = np.zeros((local_bs, size, size, 3), np.uint8)
    ok = np.zeros((local_bs,), np.int32)
    for j, (rec, img) in enumerate(zip(recs, model.decode([r["image"] for r in recs]))):
      if rec.get("error"):
        img = transforms.BadImage(rec["error"])
      if isinstance(img, transforms.BadImage):
        if cfg.data.bad_records == "fail":
          raise transforms.BadImage(f"record {rec['id']!r}: {img} (data.bad_records=fail)")
        logging.warning("eval: skipping record %r: %s", rec["id"], img)
        continue
      images[j], ok[j] = img, 1
    ids = model.generate(images)
    if procs > 1:
      ok = np.asarray(multihost_utils.process_allgather(ok)).reshape(-1)
    if me == 0:  # row q * local_bs + j is process q's j-th record of this batch
      for q in range(procs):
        for j in range(local_bs):
          index = bounds[q] + b * local_bs + j
          if index >= bounds[q + 1]:
            continue  # padding
          if ok[q * local_bs + j]:
            tokens[index] = ids[q * local_bs + j].tolist()
          else:
            skipped[index] = "unusable image"
  seconds = time.time() - t0
  if me != 0:
    multihost_utils.sync_global_devices("eval written")
    return None

  metrics = _score_and_write(model, source, tokens, skipped, split, out_dir, seconds)
  if procs > 1:
    multihost_utils.sync_global_devices("eval written")
  return metrics


def _score_and_write(model: TrainedCaptioner, source, tokens: dict[int, list[int]],
                     skipped: dict[int, str], split: str | None, out_dir: str | None,
                     seconds: float) -> dict[str, Any]:
  cfg = model.cfg
  out_dir = out_dir or model.workdir
  meta = prepare.ids_and_captions(source)
  assert len(tokens) + len(skipped) == len(meta), "every record once"
  order = sorted(tokens)
  texts = generate.decode_text(model.tok, np.asarray([tokens[i] for i in order]), model.eos) \
      if order else []
  preds = dict(zip(order, texts))
  refs = [meta[i][1] for i in order]
  metrics: dict[str, Any] = caption_metrics.score(texts, refs)
  train = cfg.data.train
  if not split and (":" in train or os.path.exists(train)):
    baseline = most_frequent_caption(prepare.open_split(cfg.data, "train"))
    metrics["baseline_caption"] = baseline
    metrics["baseline_cider"] = caption_metrics.score([baseline] * len(refs), refs)["cider"]
  if cfg.eval.content_accuracy:
    metrics["content_accuracy"] = synthetic.content_accuracy(texts, refs)
  metrics.update(step=model.step, images=len(texts), skipped_records=len(skipped),
                 processes=jax.process_count(), seconds=round(seconds, 2),
                 split=split or cfg.data.eval)
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for i, (record_id, captions) in enumerate(meta):
    row = {"id": record_id, "caption": preds.get(i), "references": captions}
    if i in skipped:
      row["skipped"] = skipped[i]
    rows.append(json.dumps(row) + "\n")
  atomic.write_text(os.path.join(out_dir, "eval_predictions.jsonl"), "".join(rows))
  atomic.write_text(os.path.join(out_dir, "eval_metrics.json"), json.dumps(metrics, indent=1) + "\n")
  metrics["samples"] = [{"id": meta[i][0], "caption": preds[i], "references": meta[i][1]}
                        for i in order[:cfg.eval.num_samples]]
  return metrics
