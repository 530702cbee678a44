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
  proc = subprocess.run([os.path.join(REPO, "launch", "local.sh"), "2", "2", "train",
                         "--workdir", str(multi), *args],
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "CAPJAX_PYTHON": sys.executable})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "[0] step 4/4" in proc.stdout and "[1] " in proc.stdout
  assert sorted(os.listdir(multi / "checkpoints")) == ["3", "4"]
  # Each process reads its own half of the data, so the batches differ from
  # the one-process run's; the losses agree in magnitude, not to the digit.
  one, two = _losses(single), _losses(multi)
  assert len(two) == 4 and np.all(np.isfinite(two))
  np.testing.assert_allclose(one[0], two[0], rtol=0.05)


def test_launcher_usage():
  proc = subprocess.run([os.path.join(REPO, "launch", "local.sh"), "--help"],
                        capture_output=True, text=True)
  assert proc.returncode == 0 and "launch/local.sh N M COMMAND" in proc.stdout
  proc = subprocess.run([os.path.join(REPO, "launch", "local.sh"), "x", "2", "train"],
                        capture_output=True, text=True)
  assert proc.returncode == 2 and "positive integers" in proc.stderr
