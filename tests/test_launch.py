"""Several processes on localhost, each with several CPU devices, train as one run."""

import json
import os
import subprocess
import sys

import numpy as np

from tests.conftest import REPO, TINY_CONFIG, run_capjax


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["train/loss"] for r in rows if "train/loss" in r]


def test_two_processes_match_one(prepared, tmp_path):
  args = ["--config", TINY_CONFIG, f"--config.data.train={prepared['train']}",
          f"--config.data.eval={prepared['val']}", "--config.train.steps=4"]
  single = tmp_path / "single"
  run_capjax("train", "--workdir", str(single), *args)
  multi = tmp_path / "multi"
  proc = _local(2, 2, "train", "--workdir", str(multi), *args)
  assert "[0] step 4/4" in proc.stdout and "[1] " in proc.stdout
  assert sorted(os.listdir(multi / "checkpoints")) == ["3", "4"]
  # Each process reads its own half of the data, so the batches differ from
  # the one-process run's; the losses agree in magnitude, not to the digit.
  one, two = _losses(single), _losses(multi)
  assert len(two) == 4 and np.all(np.isfinite(two))
  np.testing.assert_allclose(one[0], two[0], rtol=0.05)


def _local(n, m, *args):
  proc = subprocess.run([os.path.join(REPO, "launch", "local.sh"), str(n), str(m), *args],
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "CAPJAX_PYTHON": sys.executable})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


def test_eval_visits_every_record_once(prepared, synthetic_coco, tmp_path):
  """21 records (one unusable) over 1 process and over 2 x 2 devices, with a
  batch that does not divide them: each record captioned once, none lost,
  the same captions either way."""
  run = tmp_path / "run"
  run_capjax("train", "--config", TINY_CONFIG, "--workdir", str(run),
             f"--config.data.train={prepared['train']}", f"--config.data.eval={prepared['val']}",
             "--config.train.steps=2")
  ann = json.load(open(synthetic_coco / "annotations" / "captions_train.json"))
  names = [im["file_name"] for im in ann["images"][:20]]
  (tmp_path / "broken.jpg").write_bytes(open(synthetic_coco / "train" / names[0], "rb").read()[:300])
  rows = [{"image": str(synthetic_coco / "train" / f), "caption": f"caption {k}"}
          for k, f in enumerate(names)]
  rows.insert(7, {"image": "broken.jpg", "caption": "lost"})
  table = tmp_path / "eval.jsonl"
  table.write_text("".join(json.dumps(r) + "\n" for r in rows))
  args = ["--checkpoint", str(run), "--split", str(table), "--config.eval.batch_size=7"]
  run_capjax("eval", *args, "--out", str(tmp_path / "one"))
  proc = _local(2, 2, "eval", *args, "--out", str(tmp_path / "two"))
  assert "CIDEr-D" in proc.stdout and "[1] " not in "".join(
      l for l in proc.stdout.splitlines(True) if "CIDEr-D" in l)

  want = [r["image"] for r in rows]
  results = {}
  for name in ("one", "two"):
    preds = [json.loads(l) for l in open(tmp_path / name / "eval_predictions.jsonl")]
    assert [p["id"] for p in preds] == want  # every record, once, in order
    assert [p["id"] for p in preds if "skipped" in p] == ["broken.jpg"]
    metrics = json.load(open(tmp_path / name / "eval_metrics.json"))
    assert metrics["images"] == 20 and metrics["skipped_records"] == 1
    results[name] = ([p["caption"] for p in preds], metrics["cider"])
  assert json.load(open(tmp_path / "two" / "eval_metrics.json"))["processes"] == 2
  assert results["one"] == results["two"]


def test_launcher_usage():
  proc = subprocess.run([os.path.join(REPO, "launch", "local.sh"), "--help"],
                        capture_output=True, text=True)
  assert proc.returncode == 0 and "launch/local.sh N M COMMAND" in proc.stdout
  proc = subprocess.run([os.path.join(REPO, "launch", "local.sh"), "x", "2", "train"],
                        capture_output=True, text=True)
  assert proc.returncode == 2 and "positive integers" in proc.stderr
