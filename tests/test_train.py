"""The whole path through the real command: train, resume, eval, predict."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from pipeline import shm
from tests.conftest import REPO, Output, run_capjax, tiny_train_args, train_tiny as _train
from tests.test_writers import tensorboard_scalars


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_train_writes_metrics_checkpoints_and_events(trained_run):
  losses = _losses(trained_run)
  assert sorted(losses) == list(range(1, 11))
  assert losses[10] < losses[1]
  assert sorted(os.listdir(trained_run / "checkpoints")) == ["10", "9"]  # keep = 2
  assert (trained_run / "tokenizer" / "tokenizer.json").is_file()
  assert json.loads((trained_run / "config.json").read_text())["train"]["steps"] == 10

  from tensorboard.backend.event_processing import event_accumulator
  events = glob.glob(str(trained_run / "tensorboard" / "events.out.tfevents.*"))
  assert events
  acc = event_accumulator.EventAccumulator(str(trained_run / "tensorboard"),
                                           size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  tags = acc.Tags()["tensors"]
  for name in ("train/loss", "train/learning_rate", "train/grad_norm", "train/steps_per_second",
               "train/tokens_per_second", "train/step_time_s", "train/data_wait_fraction",
               "train/tflops_per_device", "train/mfu", "train/nonfinite"):
    assert name in tags, tags
  steps = [e.step for e in acc.Tensors("train/loss")]
  assert steps == list(range(1, 11))


def test_second_run_resumes_where_the_first_stopped(prepared, trained_run, tmp_path):
  _train(tmp_path, prepared, "--config.train.steps=6")
  # A save of step 8 that the process did not live to finish: Orbax's
  # temporary folder, half its files written.
  half = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1764500000"
  shutil.copytree(tmp_path / "checkpoints" / "6", half)
  for f in sorted(half.rglob("*"))[::2]:
    if f.is_file():
      f.unlink()
  proc = _train(tmp_path, prepared, "--config.train.steps=10")
  assert "resuming from the checkpoint at step 6" in proc.stdout
  assert not half.exists()  # removed, not left holding its space
  rows = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")
          if "train/loss" in l]
  assert rows == list(range(1, 11))  # nothing trained twice
  # The data position is restored too: the losses are those of one straight run.
  assert _losses(tmp_path) == _losses(trained_run)
  proc = _train(tmp_path, prepared, "--config.train.steps=10")
  assert "resuming from the checkpoint at step 10" in proc.stdout


def test_eval_and_predict(trained_run, prepared, synthetic_coco, tmp_path):
  proc = run_capjax("eval", "--checkpoint", str(trained_run))
  metrics = json.loads((trained_run / "eval_metrics.json").read_text())
  for key in ("bleu4", "rouge_l", "cider", "baseline_cider", "content_accuracy"):
    assert 0.0 <= metrics[key] <= 10.0, key
  assert metrics["images"] == 20 and metrics["step"] == 10
  preds = [json.loads(l) for l in open(trained_run / "eval_predictions.jsonl")]
  assert len(preds) == 20 and len({p["id"] for p in preds}) == 20
  assert "CIDEr-D" in proc.stdout and "content accuracy" in proc.stdout

  images = sorted(glob.glob(str(synthetic_coco / "val" / "*.jpg")))[:3]
  out = tmp_path / "preds.jsonl"
  run_capjax("predict", "--checkpoint", str(trained_run / "checkpoints" / "9"), *images,
             "--output", str(out))
  rows = [json.loads(l) for l in open(out)]
  assert [r["image"] for r in rows] == images
  for r in rows:
    assert isinstance(r["caption"], str) and r["token_ids"]
  run_capjax("predict", "--checkpoint", str(trained_run), *images, "--output", str(out),
             "--num-beams", "3", "--max-length", "5",
             "--config.eval.early_stopping=never")
  beams = [json.loads(l) for l in open(out)]
  assert [r["image"] for r in beams] == images
  assert all(1 <= len(r["token_ids"]) <= 5 for r in beams)


def _start(workdir, prepared, *overrides, own_group=False):
  """`capjax train` in the background, its stdout read line by line; with
  `own_group`, in a process group of its own (its workers and resource
  tracker with it), to be killed whole."""
  return subprocess.Popen(
      [sys.executable, "-m", "trainer.cli",
       *tiny_train_args(workdir, prepared, "--config.train.steps=100000", *overrides)],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=own_group)


def _params(workdir, step):
  from trainer import params
  restored = params.restore(str(workdir / "checkpoints" / str(step)))
  return [np.asarray(x) for x in jax.tree.leaves(restored.params)]


def test_killed_run_resumes_exactly(prepared, trained_run, tmp_path):
  """SIGKILL to the whole run (trainer, 2 workers, resource tracker) after a
  checkpoint: the restarted run ends with the parameters and per-step losses
  of one uninterrupted run, bit for bit, and removes what the killed one
  left in /dev/shm; once it is done, nothing of either is there."""
  workers = "--config.data.worker_count=2"  # the stream is the same with or without them
  proc = _start(tmp_path, prepared, "--config.checkpoint.every_steps=3", workers, own_group=True)
  try:
    Output(proc).wait_for("step 8/", 600)  # the save at 6 began, so the one at 3 is complete
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(30)
  assert os.listdir(tmp_path / "checkpoints")
  left = shm.leftovers(str(tmp_path))
  assert left, "the killed run left nothing in /dev/shm: this test shows nothing"
  again = _train(tmp_path, prepared, "--config.train.steps=10", workers)
  assert "resuming from the checkpoint at step" in again.stdout
  assert f"removed {len(left)} files that a killed run left in /dev/shm" in again.stdout
  assert not glob.glob(f"/dev/shm/*{shm.run_tag(str(tmp_path))}*")
  assert _losses(tmp_path) == _losses(trained_run)
  for a, b in zip(_params(tmp_path, 10), _params(trained_run, 10)):
    assert (a == b).all()
  # TensorBoard, read as written (no reader's purge), holds each step once:
  # the killed run's steps past its checkpoint were dropped on resume.
  logged = tensorboard_scalars(tmp_path / "tensorboard", "train/loss")
  assert [s for s, _ in logged] == list(range(1, 11))
  assert [np.float32(v) for _, v in logged] == [np.float32(l) for l in
                                                _losses(trained_run).values()]


def test_sigterm_checkpoints_the_current_step_and_exits_0(prepared, trained_run, tmp_path):
  proc = _start(tmp_path, prepared, "--config.checkpoint.every_steps=1000")
  out = Output(proc)
  try:
    out.wait_for("step 4/", 600)
    proc.send_signal(signal.SIGTERM)
    rest = out.rest(300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.wait(30) == 0, rest
  stopped = int(rest.split("preempted: checkpoint at step ")[1].split(";")[0])
  assert os.listdir(tmp_path / "checkpoints") == [str(stopped)]
  assert sorted(_losses(tmp_path)) == list(range(1, stopped + 1))
  again = _train(tmp_path, prepared, f"--config.train.steps={max(stopped, 10)}")
  assert f"resuming from the checkpoint at step {stopped}" in again.stdout
  want = _losses(trained_run)
  assert {s: l for s, l in _losses(tmp_path).items() if s <= 10} == want


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_loss(prepared, tmp_path, mode):
  """A learning rate of 1e30 blows the weights up within a few steps."""
  proc = _train(tmp_path, prepared, "--config.train.learning_rate=1e30",
                "--config.train.steps=8", f"--config.train.nonfinite={mode}", check=False)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  bad = [r["step"] for r in rows if r.get("train/nonfinite")]
  assert bad, rows
  if mode == "stop":
    assert proc.returncode == 1
    assert re.search(rf"error: step {bad[0]}: loss (nan|inf)",
                     proc.stderr.strip().splitlines()[-1].lower())
    if bad[0] > 1:
      assert str(bad[0] - 1) in os.listdir(tmp_path / "checkpoints")
      assert all(np.isfinite(x).all() for x in _params(tmp_path, bad[0] - 1))
  else:
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"step {bad[0]}: loss (nan|inf).*update skipped", proc.stdout.lower())
    assert all(np.isfinite(x).all() for x in _params(tmp_path, 8))


def test_frozen_parameters_do_not_move(prepared, tmp_path):
  _train(tmp_path, prepared, "--config.train.steps=4", "--config.checkpoint.every_steps=2",
         "--config.train.freeze=^encoder/")
  from trainer import optim, params
  names = [optim.param_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      params.restore(str(tmp_path)).params)[0]]
  before, after = _params(tmp_path, 2), _params(tmp_path, 4)
  moved = {n for n, a, b in zip(names, before, after) if not (a == b).all()}
  assert moved and all(n.startswith("decoder/") for n in moved)
  assert any(n.startswith("encoder/") for n in names)
  proc = _train(tmp_path / "x", prepared, "--config.train.freeze=^nothing", check=False)
  assert proc.returncode == 1 and "matches no parameter" in proc.stderr


def test_periodic_eval_and_the_best_model(prepared, tmp_path):
  _train(tmp_path, prepared, "--config.train.steps=6", "--config.eval.every_steps=3",
         "--config.checkpoint.best_metric=cider")
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  evals = {r["step"]: r for r in rows if "eval/cider" in r}
  assert sorted(evals) == [3, 6] and "eval/bleu4" in evals[6]
  assert evals[6]["eval/loss"] < evals[3]["eval/loss"]
  assert evals[6]["eval/perplexity"] == pytest.approx(np.exp(evals[6]["eval/loss"]), rel=1e-5)
  best = json.loads((tmp_path / "best" / "best.json").read_text())
  assert best["metric"] == "cider"
  assert best["value"] == max(evals[s]["eval/cider"] for s in evals)
  assert os.listdir(tmp_path / "best" / "checkpoints") == [str(best["step"])]
  page = (tmp_path / "samples.html").read_text()
  assert page.count("<img src=\"data:image/png;base64,") == 20  # every val image, up to 24
  latest = json.loads((tmp_path / "eval_metrics.json").read_text())
  assert latest["step"] == 6 and latest["loss"] == evals[6]["eval/loss"]
  run_capjax("eval", "--checkpoint", str(tmp_path / "best"), "--out", str(tmp_path / "b"))
  assert json.loads((tmp_path / "b" / "eval_metrics.json").read_text())["step"] == best["step"]

  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"),
                                           size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  assert [e.step for e in acc.Tensors("eval/cider")] == [3, 6]
  assert "eval/samples" in acc.Tags()["tensors"]
