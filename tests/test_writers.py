"""Metric writers: a resumed run's TensorBoard files hold each step once."""

import glob
import os

import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from trainer import writers


def tensorboard_scalars(folder, tag: str) -> list[tuple[int, float]]:
  """(step, value) of every event of `tag` in the folder's event files, as
  written: without TensorBoard's purge of steps it saw before."""
  acc = event_accumulator.EventAccumulator(str(folder), purge_orphaned_data=False,
                                           size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def test_trim_drops_steps_past_the_checkpoint_and_a_cut_short_record(tmp_path):
  w = writers.create_writer(str(tmp_path))
  for s in range(1, 6):
    w.write_scalars(s, {"train/loss": float(s)})
  w.close()
  (path,) = glob.glob(str(tmp_path / "tensorboard" / "*tfevents*"))
  with open(path, "ab") as f:
    f.write(b"\x30\x00\x00\x00\x00\x00\x00\x00\x01\x02")  # a record the kill cut short
  size = os.path.getsize(path)
  (tmp_path / "tensorboard" / ".trim-12345").write_bytes(b"half")  # a killed trim's

  writers.trim_events(str(tmp_path / "tensorboard"), 3)
  assert tensorboard_scalars(tmp_path / "tensorboard", "train/loss") == [
      (1, 1.0), (2, 2.0), (3, 3.0)]
  assert os.path.getsize(path) < size
  assert os.listdir(tmp_path / "tensorboard") == [os.path.basename(path)]  # no leftovers

  trimmed = open(path, "rb").read()
  writers.trim_events(str(tmp_path / "tensorboard"), 3)  # nothing past 3: untouched
  assert open(path, "rb").read() == trimmed
  assert np.isclose(tensorboard_scalars(tmp_path / "tensorboard", "train/loss")[-1][1], 3.0)


# Where TensorFlow, CLU and TFDS are not installed (the GPU images' case):
# importing them fails, as it does there.
WITHOUT_TENSORFLOW = '''import importlib.abc, sys

class _Missing(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in ("tensorflow", "clu", "tensorflow_datasets"):
      raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, _Missing())
'''


def test_training_without_tensorflow_writes_metrics_jsonl(tmp_path, prepared):
  """A run where TensorFlow and CLU cannot be imported: one line says the
  TensorBoard summaries are off, and metrics.jsonl holds every scalar."""
  import json
  from tests.conftest import TINY_CONFIG, run_capjax
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "sitecustomize.py").write_text(WITHOUT_TENSORFLOW)
  env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
  proc = run_capjax("train", "--config", TINY_CONFIG, "--workdir", str(tmp_path / "run"),
                    f"--config.data.train={prepared['train']}",
                    f"--config.data.eval={prepared['val']}", "--config.train.steps=2",
                    "--config.eval.every_steps=2", env=env)
  off = [l for l in proc.stdout.splitlines() if l.startswith("TensorBoard summaries off")]
  assert len(off) == 1 and "No module named" in off[0], proc.stdout
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
  assert any("eval/cider" in r for r in rows)
  assert not glob.glob(str(tmp_path / "run" / "tensorboard" / "*tfevents*"))
