"""Evaluation during training: every `eval.every_steps` steps and at the last,
the run's current parameters caption the eval split (`capjax eval`'s path,
without a restore) and give the teacher-forced loss; the scores go to the
writers, and the best model so far by `checkpoint.best_metric` to WORKDIR/best.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from ml_collections import ConfigDict

from trainer import checkpoint, params as params_lib

# Scores of the periodic evaluation logged as eval/NAME.
EVAL_SCALARS = ("loss", "perplexity", "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider",
                "content_accuracy")
LOWER_IS_BETTER = ("loss", "perplexity")


class PeriodicEval:

  def __init__(self, cfg: ConfigDict, workdir: str, mesh: Mesh, graphdef: Any, param_sh: Any,
               tokenizer_dir: str, writer: Any):
    self._cfg, self._workdir, self._mesh = cfg, workdir, mesh
    self._graphdef, self._param_sh = graphdef, param_sh
    self._tokenizer_dir, self._writer = tokenizer_dir, writer
    self._model = None  # built at the first evaluation (its generate function compiles)
    self.best = checkpoint.best_value(workdir)  # a resumed run keeps beating its best

  def due(self, step: int) -> bool:
    every = self._cfg.eval.every_steps
    return bool(every) and (step % every == 0 or step == self._cfg.train.steps)

  def __call__(self, step: int, params: Any) -> dict[str, Any] | None:
    """Evaluates `params`, the state after `step`; process 0 gets the metrics."""
    from trainer import evaluate
    from trainer.inference import TrainedCaptioner

    cfg = self._cfg
    if self._model is None:
      self._model = TrainedCaptioner(params_lib.Restored(
          self._workdir, step, cfg, self._mesh, self._graphdef, params, self._param_sh))
    self._model.params, self._model.step = params, step
    teacher_forced = evaluate.eval_loss(params, self._graphdef, cfg, self._mesh,
                                        self._tokenizer_dir)
    m = evaluate.evaluate_model(self._model, extra=teacher_forced)
    if m is not None:
      self._write(step, m)
    if cfg.checkpoint.best_metric:
      self._keep_if_best(step, params, m)
    return m

  def _write(self, step: int, m: dict[str, Any]) -> None:
    scores = {f"eval/{k}": m[k] for k in EVAL_SCALARS if k in m}
    self._writer.write_scalars(step, scores)
    self._writer.write_texts(step, {"eval/samples": "\n\n".join(
        f"**{x['caption']}**  \n" + "  \n".join(x["references"][:2]) for x in m["samples"])})
    print(f"step {step}: eval " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in scores.items()),
          flush=True)

  def _keep_if_best(self, step: int, params: Any, m: dict[str, Any] | None) -> None:
    key = self._cfg.checkpoint.best_metric
    value = float(m[key]) if m is not None else 0.0
    if jax.process_count() > 1:  # process 0 scored; all save together
      from jax.experimental import multihost_utils
      value = float(multihost_utils.broadcast_one_to_all(jnp.float32(value)))
    better = self.best is None or (value < self.best if key in LOWER_IS_BETTER
                                   else value > self.best)
    if better:
      self.best = value
      checkpoint.save_best(self._workdir, step, params, self._cfg, key, value)
