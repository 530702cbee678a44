"""The train loop's parts, each alone: the step log, the checkpoint cadence,
the periodic evaluation's schedule and the preemption notice."""

import os
import signal

import jax.numpy as jnp
import pytest

from tests.conftest import TINY_CONFIG
from trainer import checkpoint, config
from trainer.periodic_eval import PeriodicEval
from trainer.preemption import Preemption
from trainer.step_log import NonFiniteStep, StepLog, eta


class _Recorder:
  """A metric writer that keeps what it is given."""

  def __init__(self):
    self.scalars, self.flushes = [], 0

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def flush(self):
    self.flushes += 1


def _metrics(loss=1.0, nonfinite=0, skipped=0):
  return {"train/loss": jnp.float32(loss), "train/grad_norm": jnp.float32(2.0),
          "train/learning_rate": jnp.float32(0.1), "train/tokens": jnp.float32(30),
          "train/skipped_records": jnp.int32(skipped), "train/nonfinite": jnp.int32(nonfinite)}


def _cfg(*overrides):
  return config.load(TINY_CONFIG, list(overrides))


def test_step_log_reads_each_step_one_step_late(capsys):
  cfg = _cfg("config.train.steps=4", "config.train.log_every=2", "config.train.batch_size=8")
  writer = _Recorder()
  log = StepLog(cfg, writer, 0, lambda: 1e9, 1e12)
  log.push(1, _metrics(3.0, skipped=2))
  assert writer.scalars == []  # held while the next step runs
  log.push(2, _metrics(2.5))
  assert [s for s, _ in writer.scalars] == [1]
  log.push(3, _metrics(2.0))
  steps = [s for s, _ in writer.scalars]
  assert steps == [1, 2, 2]  # step 2's scalars, then its speed (log_every=2)
  speed = writer.scalars[2][1]
  assert speed["train/images_per_second"] == pytest.approx(8 * speed["train/steps_per_second"])
  assert speed["train/mfu"] == pytest.approx(1e9 * speed["train/steps_per_second"] / 1e12)
  log.flush()
  assert [s for s, _ in writer.scalars] == [1, 2, 2, 3] and writer.flushes == 1
  assert log.skipped == 2 and log.last["train/loss"] == 2.0
  out = capsys.readouterr().out
  assert "step 2/4  loss 2.5000" in out and "(2 unusable records skipped)" in out


def test_step_log_stops_or_counts_non_finite_steps(capsys):
  log = StepLog(_cfg("config.train.nonfinite=stop"), _Recorder(), 0, lambda: None, None)
  log.push(1, _metrics(float("nan"), nonfinite=1))
  with pytest.raises(NonFiniteStep) as e:
    log.flush()
  assert e.value.step == 1 and e.value.metrics["train/nonfinite"] == 1
  writer = _Recorder()
  log = StepLog(_cfg("config.train.nonfinite=skip"), writer, 0, lambda: None, None)
  log.push(1, _metrics(float("inf"), nonfinite=1))
  log.flush()
  assert log.nonfinite == 1 and writer.scalars[0][0] == 1
  assert "step 1: loss inf" in capsys.readouterr().out


def test_eta():
  assert eta(59.9) == "0m59s" and eta(61) == "1m01s" and eta(3 * 3600 + 120) == "3h02m"


def test_checkpoint_and_eval_cadence(tmp_path):
  cfg = _cfg("config.train.steps=10", "config.checkpoint.every_steps=4",
             "config.eval.every_steps=3")
  saves = checkpoint.Cadence(None, cfg, None)
  assert [s for s in range(1, 11) if saves.due(s)] == [4, 8, 10]  # and the last
  evals = PeriodicEval(cfg, str(tmp_path), None, None, None, None, None)
  assert [s for s in range(1, 11) if evals.due(s)] == [3, 6, 9, 10]
  assert evals.best is None
  cfg.eval.every_steps = 0
  assert not any(evals.due(s) for s in range(1, 11))


def test_preemption_notice_is_sigterm():
  before = signal.getsignal(signal.SIGTERM)
  preemption = Preemption()
  try:
    assert not preemption.reached(3)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.reached(4)
  finally:
    preemption.close()
  assert signal.getsignal(signal.SIGTERM) is before
