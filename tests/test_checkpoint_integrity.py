"""Checkpoints that verify: checksums saved with every checkpoint, checked on
restore; a corrupt latest checkpoint set aside and the run resumed from the
one before, exactly."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, run_capjax, train_tiny
from tests.test_train import _losses

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from trainer.checkpoint import array_checksums

    def reference(x):  # the first sum, in numpy: each 32-bit word times 2i+1, mod 2**32
      a = np.asarray(x)
      words = a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])
      u = words.reshape(-1).astype(np.uint64)
      return int((u * (2 * np.arange(u.size, dtype=np.uint64) + 1)).sum() % 2**32)

    rng = np.random.default_rng(0)
    host = {"f32": rng.normal(size=(8, 6)).astype(np.float32),
            "bf16": jnp.asarray(rng.normal(size=(4, 8, 2)), jnp.bfloat16),
            "i32": rng.integers(-9, 9, (16,)).astype(np.int32),
            "i8": rng.integers(-9, 9, (8, 2)).astype(np.int8),
            "mask": rng.random((8, 4)) > 0.5, "count": np.int32(7)}
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    specs = {"f32": P("a", "b"), "bf16": P(None, "a", "b"), "i32": P(("a", "b")),
             "i8": P("a"), "mask": P("b", "a"), "count": P()}
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}
    one = {k: jax.device_put(v, jax.devices()[0]) for k, v in host.items()}
    flips = []
    for k in ("f32", "bf16", "i8"):
      base = np.asarray(host[k])
      for n in range(0, base.size * base.dtype.itemsize * 8, 7):  # every 7th bit
        flipped = base.copy()
        flipped.view(np.uint8).reshape(-1)[n // 8] ^= 1 << (n % 8)
        flips.append(array_checksums({k: flipped})[k] != array_checksums({k: base})[k])
    print(json.dumps({"sharded": array_checksums(sharded), "one": array_checksums(one),
                      "first_sum": {k: int(v[:8], 16) for k, v in array_checksums(one).items()},
                      "reference": {k: reference(v) for k, v in host.items()},
                      "flips": flips}))
    """)


def test_checksums_are_the_same_on_any_sharding_and_see_every_bit():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["sharded"] == out["one"] and len(out["one"]) == 6
  assert out["first_sum"] == out["reference"]
  assert len(out["flips"]) > 100 and all(out["flips"])


def _flip(step_dir, many):
  """Damages the largest data file of the step's parameters: its first
  4,000 bytes inverted (compressed frames that no longer decode), or one bit
  in its middle (which still decodes)."""
  data = os.path.join(step_dir, "params", "ocdbt.process_0", "d")
  path = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
  raw = bytearray(open(path, "rb").read())
  for i in (range(4000) if many else [len(raw) // 2]):
    raw[i] ^= 0xFF if many else 0x10
  open(path, "wb").write(raw)


def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_run_resumes_exactly(
    prepared, trained_run, tmp_path):
  base = tmp_path / "base"
  train_tiny(base, prepared, "--config.train.steps=9", "--config.checkpoint.keep=3")
  assert sorted(os.listdir(base / "checkpoints")) == ["3", "6", "9"]
  runs = {}
  for kind in ("bytes", "bit"):
    runs[kind] = tmp_path / kind
    shutil.copytree(base, runs[kind])
    _flip(runs[kind] / "checkpoints" / "9", many=kind == "bytes")

  # eval of the run directory warns and scores step 6; of the step folder, fails in one line.
  proc = run_capjax("eval", "--checkpoint", str(runs["bytes"]))
  warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning: checkpoint ")]
  assert len(warnings) == 1 and "checkpoints/9: cannot be read" in warnings[0], proc.stderr
  assert warnings[0].endswith("; using step 6") and "Traceback" not in proc.stderr
  assert json.loads((runs["bytes"] / "eval_metrics.json").read_text())["step"] == 6
  # A checksum that does not match (a bit flipped where zstd's own check misses it).
  mismatch = runs["mismatch"] = tmp_path / "mismatch"
  shutil.copytree(base, mismatch)
  sums_file = mismatch / "checkpoints" / "9" / "checksums" / "metadata"
  sums = json.loads(sums_file.read_text())
  sums["params"]["decoder/wte/embedding"] = "0" * 16
  sums_file.write_text(json.dumps(sums))
  proc = run_capjax("eval", "--checkpoint", str(mismatch / "checkpoints" / "9"), check=False)
  assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
  assert proc.stderr == (f"capjax eval: error: checkpoint {mismatch}/checkpoints/9/params: "
                         "array decoder/wte/embedding does not match the checksum saved with "
                         "it\n")

  # A bit flipped in a file lands in a compressed frame (zstd's checksum sees it) or not (ours).
  for kind, why in (("bytes", "cannot be read"), ("bit", "cannot be read|does not match the "
                                                          "checksum"),
                    ("mismatch", "does not match the checksum")):
    proc = train_tiny(runs[kind], prepared, "--config.train.steps=10",
                      "--config.checkpoint.keep=3")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("checkpoint ")]
    assert len(lines) == 1 and re.search(why, lines[0]), proc.stdout
    assert lines[0].endswith(f"; moved it to {runs[kind]}/checkpoints/corrupt-9, resuming "
                             "from step 6")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert sorted(os.listdir(runs[kind] / "checkpoints")) == ["10", "6", "9", "corrupt-9"]
    assert _losses(runs[kind]) == _losses(trained_run)


@pytest.fixture
def small_disk(tmp_path):
  """A 1.4 MB tmpfs (room for one checkpoint of the tiny model, not two) and
  a function that grows it; needs root."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs",
                                          str(disk)], capture_output=True).returncode:
    pytest.skip("mounting a tmpfs needs root")
  yield disk, lambda: subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
  subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_after(
    prepared, trained_run, small_disk):
  disk, grow = small_disk
  run = disk / "run"
  args = ("--config.train.steps=9", "--config.checkpoint.keep=3")
  proc = train_tiny(run, prepared, *args, check=False)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stdout + proc.stderr
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
      f"capjax train: error: checkpoint of step 6 to {run}/checkpoints failed: no space left "
      "on device; "), proc.stderr
  assert "the last complete checkpoint is step 3: run the same command" in proc.stderr
  assert os.listdir(run / "checkpoints") == ["3"]  # the failed save's folder removed
  assert "No space left on device" in (run / "logs" / "errors.log").read_text()
  grow()
  again = train_tiny(run, prepared, *args)
  assert "resuming from the checkpoint at step 3" in again.stdout
  assert sorted(os.listdir(run / "checkpoints"), key=int) == ["3", "6", "9"]
  rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
  assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 10))
  want = _losses(trained_run)
  assert _losses(run) == {s: want[s] for s in range(1, 10)}


def test_the_error_log_keeps_what_it_could_not_write(tmp_path):
  """A write the disk refuses (full, here: a file where the log's folder
  goes) is kept and written with the next one, in order."""
  from trainer import faults
  (tmp_path / "logs").write_text("in the way")
  log = faults._File(str(tmp_path / "logs" / "errors.log"))
  log.write("first\n")
  assert log.pending == "first\n"
  (tmp_path / "logs").unlink()
  log.write("second\n")
  assert (tmp_path / "logs" / "errors.log").read_text() == "first\nsecond\n" and not log.pending
