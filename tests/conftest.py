"""Shared fixtures: a small synthetic dataset, prepared once per session."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "tests", "tiny_config.py")


def run_capjax(*args, check=True, env=None, timeout=600, clean_env=None):
  """Runs the real `capjax` command in a subprocess; returns the CompletedProcess.
  `env` adds to the environment (`clean_env`, or this process's)."""
  proc = subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env={**(os.environ if clean_env is None else clean_env), **(env or {})})
  if check and proc.returncode != 0:
    raise AssertionError(f"capjax {' '.join(args)} exited {proc.returncode}:\n"
                         f"{proc.stdout}\n{proc.stderr}")
  return proc


def run_local(n, m, *args, timeout=900):
  """`launch/local.sh N M ARGS...`: N processes on localhost, M CPU devices each."""
  proc = subprocess.run([os.path.join(REPO, "launch", "local.sh"), str(n), str(m), *args],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "CAPJAX_PYTHON": sys.executable})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
  from pipeline import synthetic

  out = tmp_path_factory.mktemp("synthetic") / "coco"
  synthetic.generate(str(out), num_train=96, num_val=20, side=48, seed=1, processes=2)
  return out


@pytest.fixture(scope="session")
def prepared(synthetic_coco, tmp_path_factory):
  """{split: prepared folder} for the small synthetic set."""
  root = tmp_path_factory.mktemp("prepared")
  out = {}
  for split in ("train", "val"):
    out[split] = str(root / split)
    run_capjax("prepare", str(synthetic_coco / "annotations" / f"captions_{split}.json"),
               "--images", str(synthetic_coco / split), "--out", out[split],
               "--num-shards", "3")
  return out
