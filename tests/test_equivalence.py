"""One config, the same numbers however it is laid out: 20 steps of the demo
model give the same per-step losses on 1 device, on 8 devices as data=8 and
as data=2 fsdp=2 tensor=2, and on 2 processes x 4 devices; and so does the
demo with a DINOv2 encoder, sharded."""

import json
import os

import numpy as np
import pytest

from tests.conftest import run_capjax, run_local

# One worker runs the module: its module-scoped runs are made once.
pytestmark = pytest.mark.xdist_group("equivalence")

STEPS = 20


def _args(prepared, workdir, *extra, steps=STEPS):
  return ["train", "--config", "demo", "--workdir", str(workdir),
          f"--config.data.train={prepared['train']}", f"--config.data.eval={prepared['val']}",
          f"--config.train.steps={steps}", "--config.data.worker_count=0",
          f"--config.checkpoint.every_steps={steps}", *extra]


def _losses(workdir, steps=STEPS):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  assert sorted(losses) == list(range(1, steps + 1))
  return np.array([losses[s] for s in range(1, steps + 1)])


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


DINOV2 = """from configs import demo

def get_config():
  c = demo.get_config()
  c.model.encoder.update(model_type="dinov2_with_registers", num_register_tokens=2,
                         use_swiglu_ffn=True, mlp_ratio=4, layerscale_value=0.5,
                         num_hidden_layers=2)
  c.train.batch_size = 16
  return c
"""


@pytest.mark.xdist_group("dinov2")  # apart from the module's runs, which share one
def test_a_dinov2_encoder_sharded_matches_one_device(prepared, tmp_path):
  """The encoder family furthest from ViT (registers, layer scale, SwiGLU),
  trained as data=2 fsdp=2 tensor=2 for 8 steps: the losses of one device."""
  config = tmp_path / "dinov2.py"
  config.write_text(DINOV2)
  losses = []
  for name, mesh, devices in (("one", (), 1), ("sharded", ("--config.mesh.data=2",
                              "--config.mesh.fsdp=2", "--config.mesh.tensor=2"), 8)):
    args = _args(prepared, tmp_path / name, *mesh, steps=8)
    args[args.index("demo")] = str(config)
    run_capjax(*args, env=_devices(devices))
    with open(tmp_path / name / "config.json") as f:
      assert json.load(f)["model"]["encoder"]["model_type"] == "dinov2_with_registers"
    losses.append(_losses(tmp_path / name, steps=8))
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
