"""`capjax eval`: caption every image of a split and score the captions.

Writes `eval_predictions.jsonl`, `eval_metrics.json` and `samples.html` (the
first images with their predicted and reference captions) into the run
directory, each written whole, then renamed into place, and prints samples.
"""

from __future__ import annotations

import base64
import collections
import html
import json
import logging
import time
from typing import Any, Sequence

import cv2
import jax
import numpy as np

from pipeline import fs, images, mixture, sources, synthetic, transforms
from trainer import generate, sharding
from trainer.metrics import caption_metrics
from trainer.inference import TrainedCaptioner


def most_frequent_caption(source) -> str:
  counts = collections.Counter(c for _, caps in mixture.ids_and_captions(source)
                               for c in caps)
  return counts.most_common(1)[0][0]


def evaluate(checkpoint_path: str, split: str | None, out_dir: str | None,
             overrides: Sequence[str] = ()) -> dict[str, Any] | None:
  """Scores a split (default: the config's `data.eval`); process 0 writes into
  `out_dir` (default: the run directory) and returns the metrics, the other
  processes None."""
  return evaluate_model(TrainedCaptioner(checkpoint_path, overrides), split, out_dir)


def evaluate_model(model: TrainedCaptioner, split: str | None = None,
                   out_dir: str | None = None,
                   extra: dict[str, float] | None = None) -> dict[str, Any] | None:
  """`evaluate` for a model in hand (a training run's current parameters);
  `extra` metrics (e.g. the eval loss) are written with the scores.

  Every record is captioned exactly once over all processes: each takes a
  contiguous share, and the last batches are padded (the padding masked out),
  never dropped. A record whose image cannot be used is skipped and counted
  (`data.bad_records="skip"`) or stops the evaluation (`"fail"`).
  """
  from jax.experimental import multihost_utils

  cfg = model.cfg
  source = sources.open_source(split) if split else sources.open_split(cfg.data, "eval")
  procs, me = jax.process_count(), jax.process_index()
  local_bs, bounds, num_batches = _shares(len(source), cfg.eval.batch_size)
  size = cfg.data.image_size
  t0 = time.time()
  tokens: dict[int, list[int]] = {}
  skipped: dict[int, str] = {}
  for b in range(num_batches):
    start = bounds[me] + b * local_bs
    mine = range(start, min(start + local_bs, bounds[me + 1]))
    recs = [source[i] for i in mine]
    pixels = np.zeros((local_bs, size, size, 3), np.uint8)
    ok = np.zeros((local_bs,), np.int32)
    for j, (rec, img) in enumerate(zip(recs, model.decode([r["image"] for r in recs]))):
      if rec.get("error"):
        img = images.BadImage(rec["error"])
      if isinstance(img, images.BadImage):
        if cfg.data.bad_records == "fail":
          raise images.BadImage(f"record {rec['id']!r}: {img} (data.bad_records=fail)")
        logging.warning("eval: skipping record %r: %s", rec["id"], img)
        continue
      pixels[j], ok[j] = img, 1
    ids = model.generate(pixels)
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

  metrics = _score_and_write(model, source, tokens, skipped, split, out_dir, seconds, extra)
  if procs > 1:
    multihost_utils.sync_global_devices("eval written")
  return metrics


def _shares(n: int, global_batch: int) -> tuple[int, list[int], int]:
  """(rows a process feeds per batch, each process's contiguous share of the
  n records as bounds, batches to cover the largest share)."""
  local_bs = sharding.local_batch_size(global_batch)
  procs = jax.process_count()
  bounds = [n * q // procs for q in range(procs + 1)]
  return local_bs, bounds, -(-max(b - a for a, b in zip(bounds, bounds[1:])) // local_bs)


def _score_and_write(model: TrainedCaptioner, source, tokens: dict[int, list[int]],
                     skipped: dict[int, str], split: str | None, out_dir: str | None,
                     seconds: float, extra: dict[str, float] | None = None) -> dict[str, Any]:
  cfg = model.cfg
  out_dir = out_dir or model.workdir
  meta = sources.ids_and_captions(source)
  assert len(tokens) + len(skipped) == len(meta), "every record once"
  order = sorted(tokens)
  texts = generate.decode_text(model.tok, np.asarray([tokens[i] for i in order]), model.eos) \
      if order else []
  preds = dict(zip(order, texts))
  refs = [meta[i][1] for i in order]
  metrics: dict[str, Any] = caption_metrics.score(texts, refs)
  if not split and mixture.present(cfg.data.train):
    baseline = most_frequent_caption(mixture.open_train(cfg.data))
    metrics["baseline_caption"] = baseline
    metrics["baseline_cider"] = caption_metrics.score([baseline] * len(refs), refs)["cider"]
  if cfg.eval.content_accuracy:
    metrics["content_accuracy"] = synthetic.content_accuracy(texts, refs)
  metrics.update(extra or {})
  metrics.update(step=model.step, images=len(texts), skipped_records=len(skipped),
                 processes=jax.process_count(), seconds=round(seconds, 2),
                 split=split or cfg.data.eval)
  fs.makedirs(out_dir)
  rows = []
  for i, (record_id, captions) in enumerate(meta):
    row = {"id": record_id, "caption": preds.get(i), "references": captions}
    if i in skipped:
      row["skipped"] = skipped[i]
    rows.append(json.dumps(row) + "\n")
  fs.write_text(fs.join(out_dir, "eval_predictions.jsonl"), "".join(rows))
  fs.write_text(fs.join(out_dir, "eval_metrics.json"), json.dumps(metrics, indent=1) + "\n")
  shown = order[:HTML_SAMPLES]
  fs.write_text(fs.join(out_dir, "samples.html"),
                samples_html(source, shown, preds, meta, metrics))
  metrics["samples"] = [{"id": meta[i][0], "caption": preds[i], "references": meta[i][1]}
                        for i in order[:cfg.eval.num_samples]]
  return metrics


HTML_SAMPLES = 24  # images shown in samples.html
_THUMB = 192  # their size there, in pixels


def samples_html(source, indices: Sequence[int], preds: dict[int, str], meta,
                 metrics: dict[str, Any]) -> str:
  """A static page: each image with its predicted and reference captions."""
  def thumb(i):
    try:
      img = images.decode_and_resize(source[i]["image"], _THUMB, "crop")
    except images.BadImage:
      return ""
    ok, png = cv2.imencode(".png", img[:, :, ::-1])
    return f'<img src="data:image/png;base64,{base64.b64encode(png.tobytes()).decode()}">'

  scores = "  ".join(f"{k} {metrics[k]:.3f}" for k in ("bleu4", "rouge_l", "cider")
                     if k in metrics)
  rows = []
  for i in indices:
    refs = "".join(f"<li>{html.escape(r)}</li>" for r in meta[i][1])
    rows.append(f"<tr><td>{thumb(i)}</td><td><b>{html.escape(preds[i])}</b>"
                f"<ul>{refs}</ul><small>{html.escape(str(meta[i][0]))}</small></td></tr>")
  return (f"<!doctype html><meta charset=utf-8><title>capjax samples, step {metrics['step']}"
          f"</title><style>body{{font-family:sans-serif}} td{{vertical-align:top;padding:6px}}"
          f"</style><h3>Step {metrics['step']}: {html.escape(scores)}</h3><table>"
          + "".join(rows) + "</table>\n")


def eval_loss(params, graphdef, cfg, mesh, tokenizer_dir: str) -> dict[str, float]:
  """Teacher-forced loss and perplexity over the whole eval split (every
  record once over all processes, `data.captions_per_image` captions each)."""
  from trainer import step as step_lib

  source = sources.open_split(cfg.data, "eval")
  make_batch = transforms.TrainBatch.from_config(cfg, tokenizer_dir, random_crops=False)
  me = jax.process_index()
  local_bs, bounds, num_batches = _shares(len(source), cfg.eval.batch_size)
  sums = jax.jit(lambda p, b: step_lib.token_losses(p, graphdef, b))
  total = tokens = 0.0
  for b in range(num_batches):
    start = bounds[me] + b * local_bs
    mine = list(range(start, min(start + local_bs, bounds[me + 1])))
    batch = make_batch.map([(i, source[i]) for i in mine]) if mine else None
    padded = {}
    for key, shape, dtype in (("image", (cfg.data.image_size,) * 2 + (3,), np.uint8),
                              ("input_ids", (cfg.data.captions_per_image, cfg.data.max_length),
                               np.int32),
                              ("labels", (cfg.data.captions_per_image, cfg.data.max_length),
                               np.int32),
                              ("loss_mask", (cfg.data.captions_per_image, cfg.data.max_length),
                               np.float32)):
      padded[key] = np.zeros((local_bs, *shape), dtype)  # padding rows: no loss
      if batch is not None:
        padded[key][:len(mine)] = batch[key]
    t, k = sums(params, sharding.global_batch(padded, mesh))
    total, tokens = total + float(t), tokens + float(k)
  loss = total / max(tokens, 1.0)
  return {"loss": loss, "perplexity": float(np.exp(loss))}
