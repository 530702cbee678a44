"""WORKDIR/best: the model scoring highest so far, a run directory of its own."""

from __future__ import annotations

import json
from typing import Any

import jax
from ml_collections import ConfigDict

from pipeline import fs
from trainer.checkpoint.cadence import save_args
from trainer.checkpoint.mirror import manager


BEST = "best"  # WORKDIR/best: a run directory of its own, the best model so far


def save_best(workdir: str, step: int, params: Any, config: ConfigDict, metric: str,
              value: float) -> None:
  """The model scoring highest so far on `metric` into WORKDIR/best (with the
  tokenizer, so `eval`, `predict` and `export-hf` take it as they take a run)."""
  best = fs.join(workdir, BEST)
  mngr = manager(best, keep=1)
  mngr.save(step, args=save_args({"params": params}, {"config": config.to_dict()}), force=True)
  mngr.wait_until_finished()
  mngr.close()
  if jax.process_index() == 0:
    if not fs.isdir(fs.join(best, "tokenizer")):
      fs.copytree(fs.join(workdir, "tokenizer"), fs.join(best, "tokenizer"))
    fs.write_text(fs.join(best, "best.json"),
                  json.dumps({"step": step, "metric": metric, "value": value}) + "\n")


def best_value(workdir: str) -> float | None:
  """The score of WORKDIR/best, if any (a resumed run keeps beating it)."""
  path = fs.join(workdir, BEST, "best.json")
  if not fs.exists(path):
    return None
  return float(json.loads(fs.read_text(path))["value"])
