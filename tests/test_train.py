"""The whole path through the real command: train, resume, eval, predict."""

import glob
import json
import os

import pytest

from tests.conftest import TINY_CONFIG, run_capjax


def _train(workdir, prepared, *overrides):
  return run_capjax("train", "--config", TINY_CONFIG, "--workdir", str(workdir),
                    f"--config.data.train={prepared['train']}",
                    f"--config.data.eval={prepared['val']}",
                    "--config.train.schedule=constant", *overrides)


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def run_10_steps(prepared, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  _train(workdir, prepared, "--config.train.steps=10")
  return workdir


def test_train_writes_metrics_checkpoints_and_events(run_10_steps):
  losses = _losses(run_10_steps)
  assert sorted(losses) == list(range(1, 11))
  assert losses[10] < losses[1]
  assert sorted(os.listdir(run_10_steps / "checkpoints")) == ["10", "9"]  # keep = 2
  assert (run_10_steps / "tokenizer" / "tokenizer.json").is_file()
  assert json.loads((run_10_steps / "config.json").read_text())["train"]["steps"] == 10

  from tensorboard.backend.event_processing import event_accumulator
  events = glob.glob(str(run_10_steps / "tensorboard" / "events.out.tfevents.*"))
  assert events
  acc = event_accumulator.EventAccumulator(str(run_10_steps / "tensorboard"),
                                           size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  tags = acc.Tags()["tensors"]
  for name in ("train/loss", "train/learning_rate", "train/grad_norm", "train/steps_per_second"):
    assert name in tags, tags
  steps = [e.step for e in acc.Tensors("train/loss")]
  assert steps == list(range(1, 11))


def test_second_run_resumes_where_the_first_stopped(prepared, run_10_steps, tmp_path):
  _train(tmp_path, prepared, "--config.train.steps=6")
  proc = _train(tmp_path, prepared, "--config.train.steps=10")
  assert "resuming from the checkpoint at step 6" in proc.stdout
  rows = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")
          if "train/loss" in l]
  assert rows == list(range(1, 11))  # nothing trained twice
  # The data position is restored too: the losses are those of one straight run.
  assert _losses(tmp_path) == _losses(run_10_steps)
  proc = _train(tmp_path, prepared, "--config.train.steps=10")
  assert "resuming from the checkpoint at step 10" in proc.stdout


def test_eval_and_predict(run_10_steps, prepared, synthetic_coco, tmp_path):
  proc = run_capjax("eval", "--checkpoint", str(run_10_steps))
  metrics = json.loads((run_10_steps / "eval_metrics.json").read_text())
  for key in ("bleu4", "rouge_l", "cider", "baseline_cider", "content_accuracy"):
    assert 0.0 <= metrics[key] <= 10.0, key
  assert metrics["images"] == 20 and metrics["step"] == 10
  preds = [json.loads(l) for l in open(run_10_steps / "eval_predictions.jsonl")]
  assert len(preds) == 20 and len({p["id"] for p in preds}) == 20
  assert "CIDEr-D" in proc.stdout and "content accuracy" in proc.stdout

  images = sorted(glob.glob(str(synthetic_coco / "val" / "*.jpg")))[:3]
  out = tmp_path / "preds.jsonl"
  run_capjax("predict", "--checkpoint", str(run_10_steps / "checkpoints" / "9"), *images,
             "--output", str(out))
  rows = [json.loads(l) for l in open(out)]
  assert [r["image"] for r in rows] == images
  for r in rows:
    assert isinstance(r["caption"], str) and r["token_ids"]
  run_capjax("predict", "--checkpoint", str(run_10_steps), *images, "--output", str(out),
             "--num-beams", "3", "--max-length", "5",
             "--config.eval.early_stopping=never")
  beams = [json.loads(l) for l in open(out)]
  assert [r["image"] for r in beams] == images
  assert all(1 <= len(r["token_ids"]) <= 5 for r in beams)
