"""Several processes on localhost, each with several CPU devices, act as one run
(training as one is in test_equivalence.py)."""

import json
import os
import signal
import subprocess
import sys

from tests.conftest import REPO, TINY_CONFIG, run_capjax, run_local


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
  proc = run_local(2, 2, "eval", *args, "--out", str(tmp_path / "two"))
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


def _descendants(pid):
  """Process ids below `pid`, read from /proc."""
  parents = {}
  for p in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{p}/stat") as f:
        parents[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
      pass
  out, frontier = [], [pid]
  while frontier:
    kids = [p for p, parent in parents.items() if parent in frontier]
    out += kids
    frontier = kids
  return out


def test_preemption_of_two_processes_checkpoints_one_step(prepared, tmp_path):
  """SIGTERM to every process of a 2 x 2 run: JAX's preemption service agrees
  on a step, both save it and exit 0."""
  proc = subprocess.Popen(
      [os.path.join(REPO, "launch", "local.sh"), "2", "2", "train", "--config", TINY_CONFIG,
       "--workdir", str(tmp_path), f"--config.data.train={prepared['train']}",
       f"--config.data.eval={prepared['val']}", "--config.train.steps=100000",
       "--config.checkpoint.every_steps=100000"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env={**os.environ, "CAPJAX_PYTHON": sys.executable})
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if "step 6/" in line:
      break
  for pid in _descendants(proc.pid):
    try:
      with open(f"/proc/{pid}/cmdline") as f:
        if "trainer.cli" in f.read():
          os.kill(pid, signal.SIGTERM)
    except OSError:
      pass
  rest = proc.stdout.read()
  assert proc.wait(timeout=300) == 0, "".join(seen) + rest
  steps = {l.split("checkpoint at step ")[1].split(";")[0] for l in rest.splitlines()
           if "preempted" in l}
  assert len(steps) == 1 and os.listdir(tmp_path / "checkpoints") == list(steps)
