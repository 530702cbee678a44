"""Run directories in buckets, against real servers on 127.0.0.1: moto's S3
server and gcp-storage-emulator, reached by the real clients (TensorStore,
gcsfs, s3fs) through their documented endpoint settings."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests import buckets
from tests.conftest import REPO, run_capjax, tiny_train_args

# Distinctive, so that a copy of one anywhere in the run directory is found.
SECRET = "capjax-secret-9d2e41"
SERVERS = {"gs": buckets.gcs_server, "s3": buckets.s3_server}


@pytest.fixture(scope="module", params=sorted(SERVERS))
def store(request, tmp_path_factory):
  """(scheme, the environment capjax runs with) for one server, up for the
  module; capjax's local stages and logs in a folder of the test's."""
  with SERVERS[request.param]() as env:
    key = "GOOGLE_AUTH_TOKEN_FOR_TESTING" if request.param == "gs" else "AWS_SECRET_ACCESS_KEY"
    cache = str(tmp_path_factory.mktemp(f"cache-{request.param}"))
    yield request.param, buckets.scrubbed({**env, key: SECRET, "CAPJAX_CACHE": cache})


@pytest.fixture
def client(store, monkeypatch):
  """This process's fs layer pointed at the store's server."""
  for k, v in store[1].items():
    monkeypatch.setenv(k, v)
  buckets.forget_clients()
  from pipeline import fs
  yield fs
  buckets.forget_clients()


def _capjax(env, *args, check=True):
  return run_capjax(*args, check=check, clean_env=env, timeout=600)


def _losses(fs, workdir):
  rows = [json.loads(l) for l in fs.read_text(fs.join(workdir, "metrics.jsonl")).splitlines()]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _local_losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _tensors(folder):
  from safetensors.numpy import load_file
  return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def local_export(trained_run, tmp_path_factory):
  out = tmp_path_factory.mktemp("local-export") / "hf"
  run_capjax("export-hf", str(trained_run), "--out", str(out))
  return out


def test_a_run_in_a_bucket_resumes_evaluates_and_exports_as_a_local_one(
    store, client, prepared, trained_run, local_export, tmp_path):
  """SIGKILL after the checkpoint at 6 (a step left half-written beside it),
  then resumed to 10: the per-step losses and the exported weights equal an
  uninterrupted local run's bit for bit; eval writes its outputs there."""
  scheme, env = store
  fs = client
  workdir = f"{scheme}://{buckets.BUCKET}/{tmp_path.name}/run"
  proc = subprocess.Popen(
      [sys.executable, "-m", "trainer.cli",
       *tiny_train_args(workdir, prepared, "--config.train.steps=100000",
                        "--config.checkpoint.every_steps=3")],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if "step 10/" in line:
      break
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  from trainer import faults
  steps = faults.committed_steps(workdir)
  assert steps and max(steps) >= 3, "".join(seen)
  # What a save killed midway leaves: a step's files without its commit marker.
  marker = {"gs": faults.GCS_COMMIT, "s3": faults.S3_COMMIT}[scheme]
  ckpts = fs.join(workdir, "checkpoints")
  for name in fs.files(fs.join(ckpts, str(max(steps)))):
    if os.path.basename(name) != marker:
      fs.copy(fs.join(ckpts, str(max(steps)), name), fs.join(ckpts, "99", name))
  assert faults.committed_steps(workdir) == steps

  again = _capjax(env, *tiny_train_args(workdir, prepared, "--config.train.steps=10"))
  assert f"resuming from the checkpoint at step {max(steps)}" in again.stdout, again.stdout
  assert _losses(fs, workdir) == _local_losses(trained_run)
  assert any(n.startswith("events.out.tfevents") for n in fs.listdir(fs.join(workdir,
                                                                           "tensorboard")))
  assert faults.committed_steps(workdir) == [9, 10]  # keep = 2; 99 was never one

  evaluated = _capjax(env, "eval", "--checkpoint", workdir)
  assert "BLEU-4" in evaluated.stdout
  metrics = json.loads(fs.read_text(fs.join(workdir, "eval_metrics.json")))
  assert metrics["step"] == 10 and metrics["images"] == 20
  assert fs.isfile(fs.join(workdir, "samples.html"))
  assert len(fs.read_text(fs.join(workdir, "eval_predictions.jsonl")).splitlines()) == 20

  out = tmp_path / "hf"
  _capjax(env, "export-hf", workdir, "--out", str(out))
  mine, local = _tensors(out), _tensors(local_export)
  assert sorted(mine) == sorted(local)
  for k in local:
    assert np.array_equal(mine[k], local[k]), k
  from transformers import VisionEncoderDecoderModel
  VisionEncoderDecoderModel.from_pretrained(str(out))

  # Each process's stage went with it (the killed one's when the next started).
  runs = os.path.join(env["CAPJAX_CACHE"], "runs")
  assert not [n for d in os.listdir(runs) for n in os.listdir(os.path.join(runs, d))
              if n.startswith("stage-")]
  # Credentials come from the environment alone: none reaches the run directory.
  for name in fs.files(workdir):
    assert SECRET.encode() not in fs.read_bytes(fs.join(workdir, name)), name
