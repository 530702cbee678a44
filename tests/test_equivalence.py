"""One config, the same numbers however it is laid out: 20 steps of the demo
model give the same per-step losses on 1 device, on 8 devices as data=8 and
as data=2 fsdp=2 tensor=2, and on 2 processes x 4 devices."""

import json
import os

import numpy as np
import pytest

from tests.conftest import run_capjax, run_local

# One worker runs the module: its module-scoped runs are made once.
pytestmark = pytest.mark.xdist_group("equivalence")

STEPS = 20


def _args(prepared, workdir, *extra):
  return ["train", "--config", "demo", "--workdir", str(workdir),
          f"--config.data.train={prepared['train']}", f"--config.data.eval={prepared['val']}",
          f"--config.train.steps={STEPS}", "--config.data.worker_count=0",
          f"--config.checkpoint.every_steps={STEPS}", *extra]


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  assert sorted(losses) == list(range(1, STEPS + 1))
  return np.array([losses[s] for s in range(1, STEPS + 1)])


def _devices(n):
  return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


@pytest.fixture(scope="module")
def one_device(prepared, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_device")
  run_capjax(*_args(prepared, workdir), env=_devices(1))
  return _losses(workdir)


@pytest.mark.parametrize("data,fsdp,tensor", [(8, 1, 1), (2, 2, 2)])
def test_eight_devices_match_one(prepared, one_device, tmp_path, data, fsdp, tensor):
  run_capjax(*_args(prepared, tmp_path, f"--config.mesh.data={data}",
                    f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={tensor}"),
             env=_devices(8))
  np.testing.assert_allclose(_losses(tmp_path), one_device, rtol=1e-5)


def test_two_processes_of_four_devices_match_one(prepared, one_device, tmp_path):
  proc = run_local(2, 4, *_args(prepared, tmp_path))
  assert f"[0] step {STEPS}/{STEPS}" in proc.stdout and "[1] " in proc.stdout
  assert os.listdir(tmp_path / "checkpoints") == [str(STEPS)]
  np.testing.assert_allclose(_losses(tmp_path), one_device, rtol=1e-5)
