"""bench/device.py, the accelerator bench, at its tiny size on this CPU: every
part runs and its JSON line holds the figures the GPU run reports."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_the_device_bench_runs_at_its_tiny_size(tmp_path):
  out = tmp_path / "device.json"
  # torch.compile's path is the eager one under torch.compile: its C++ build
  # on this CPU would take a minute, so the GPU run is where it is exercised.
  proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "device.py"), "--tiny",
                         "--skip", "pytorch_compiled", "--peak-flops", "1e12", "--out", str(out)],
                        cwd=tmp_path, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result == json.loads(out.read_text())
  assert result["errors"] == {} and result["skipped"] == []
  shapes = [(r["batch"], r["captions_per_image"]) for r in result["train"]]
  assert shapes == [(4, 5), (8, 5), (4, 1)]
  for r in result["train"]:
    tokens = r["images_per_s"] * r["captions_per_image"] * 8  # tiny captions: 8 tokens
    assert r["images_per_s"] > 0 and abs(r["tokens_per_s"] - tokens) <= 1e-3 * tokens
    assert 0 < r["mfu"] < 1
    assert abs(r["mfu"] - r["tflop_per_step_per_device"] / r["step_s"]) < 0.01 * r["mfu"] + 1e-6
  assert [(r["captions_per_image"], r["compiled"]) for r in result["pytorch"]] == \
      [(5, False), (1, False)]
  assert set(result["speedup_vs_pytorch"]) == {"5_captions", "1_captions"}
  assert result["speedup_vs_pytorch"]["5_captions"]["vs_better"] > 0
  g = result["generate"]
  assert g["images_per_s"] > 0 and g["speedup_vs_transformers"] > 0
  assert g["identical_captions_share"] == 1.0  # tiny model: no bfloat16 near-ties
  assert result["loader"]["images_per_s_per_core"] > 0 and result["host_cores_per_device"] > 0
