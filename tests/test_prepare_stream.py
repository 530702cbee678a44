"""`capjax prepare` streaming into shards: bounded memory, resumption after
SIGKILL to byte-identical output, the Beam runner's output equal to the
local one's."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import simplejpeg

from bench.memory import peak_sum, peaks
from pipeline import images, prepare, records, shm, sources
from tests.conftest import REPO, run_capjax


def _noise_table(folder, n, h=240, w=320, seed=0):
  """A CSV of `n` JPEGs of noise (photo-sized files that do not compress),
  one caption each; returns (its path, the JPEGs' bytes in all)."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder / "img", exist_ok=True)
  rows, total = [], 0
  for i in range(n):
    data = simplejpeg.encode_jpeg(rng.integers(0, 256, (h, w, 3), np.uint8), quality=90)
    (folder / "img" / f"{i:05d}.jpg").write_bytes(data)
    total += len(data)
    rows.append(f"img/{i:05d}.jpg,noise number {i}\n")
  table = folder / "table.csv"
  table.write_text("image,caption\n" + "".join(rows))
  return table, total


def _shards(folder):
  return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))
          if name.startswith("data-")}


def _counts_written(out):
  work = out / ".prepare"
  return [f for f in os.listdir(work) if f.startswith("data-") and f.endswith(".json")] \
      if work.is_dir() else []


@pytest.mark.parametrize("workers", ["1", "2"])  # prepare's own process; a pool
def test_killed_prepare_resumes_to_identical_shards(tmp_path, workers):
  table, _ = _noise_table(tmp_path, 240)
  args = [str(table), "--workers", workers, "--num-shards", "8"]
  whole = tmp_path / "whole"
  run_capjax("prepare", *args, "--out", str(whole))

  out = tmp_path / "out"
  proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "prepare", *args, "--out",
                           str(out)], cwd=REPO, start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while not _counts_written(out) and time.monotonic() < deadline and proc.poll() is None:
    time.sleep(0.005)
  os.killpg(proc.pid, signal.SIGKILL)  # the command and its workers, midway
  proc.wait()
  written = len(_counts_written(out))
  assert 1 <= written < 8, written
  assert not (out / records.MANIFEST).exists()
  with pytest.raises(FileNotFoundError, match="did not finish: run it again"):
    records.PreparedSource(str(out))
  # the pool's semaphores, left in /dev/shm with the tracker killed too
  assert bool(shm.leftovers(str(out))) == (workers == "2")

  again = run_capjax("prepare", *args, "--out", str(out))
  assert not shm.leftovers(str(out))
  kept = int(again.stderr.split("prepare: ")[1].split(" of 8 shards already written")[0])
  assert kept >= written and kept < 8
  assert "prepare: done, 240 records in 8 shards" in again.stderr
  assert _shards(out) == _shards(whole) and len(_shards(out)) == 8
  assert json.loads((out / records.MANIFEST).read_text()) == \
      json.loads((whole / records.MANIFEST).read_text())
  assert not [f for f in os.listdir(out / ".prepare") if ".tmp-" in f]
  assert len(records.PreparedSource(str(out))) == 240


def test_prepare_again_reuses_or_starts_over(tmp_path):
  table, _ = _noise_table(tmp_path, 24, h=32, w=32)
  source = sources.open_source(str(table))
  out = tmp_path / "out"
  first = prepare.prepare(source, str(out), num_shards=3, workers=1, progress_every=0)
  before = _shards(out)
  assert prepare.prepare(source, str(out), num_shards=3, workers=1) == first
  assert _shards(out) == before
  # Other options: the old shards go, the new ones are written.
  shrunk = prepare.prepare(source, str(out), num_shards=3, workers=1, resize_shorter=16)
  assert shrunk["resize_shorter"] == 16 and _shards(out) != before
  image = images.decode_image(records.PreparedSource(str(out))[0]["image"])
  assert image.shape[:2] == (16, 16) and len(_shards(out)) == 3
  # A folder holding anything else is not touched.
  (out / "notes.txt").write_text("mine")
  with pytest.raises(prepare.SourceError, match="holds files prepare did not write"):
    prepare.prepare(source, str(out), num_shards=4, workers=1)
  assert (out / "notes.txt").read_text() == "mine" and len(_shards(out)) == 3


def test_one_worker_writes_what_two_write(tmp_path):
  table, _ = _noise_table(tmp_path, 30, h=32, w=32)
  (tmp_path / "img" / "00007.jpg").write_bytes(b"not a jpeg")
  source = sources.open_source(str(table))
  one = prepare.prepare(source, str(tmp_path / "one"), num_shards=4, workers=1)
  two = prepare.prepare(source, str(tmp_path / "two"), num_shards=4, workers=2)
  assert one == two and one["records"] == 29 and sum(one["skipped"].values()) == 1
  assert _shards(tmp_path / "one") == _shards(tmp_path / "two")


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_lines(tmp_path, capfd, workers):
  table, _ = _noise_table(tmp_path, 40, h=32, w=32)
  prepare.prepare(sources.open_source(str(table)), str(tmp_path / "out"), num_shards=4,
                  workers=workers, progress_every=0)
  err = capfd.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("prepare: ")]
  assert any("images/s" in line and "ETA" in line and "skipped" in line for line in lines)
  assert lines[-1].startswith("prepare: done, 40 records in 4 shards (0 kept from before)")


def test_memory_stays_flat_as_the_input_grows(tmp_path):
  """Peak memory of the whole process tree, 300 vs 1,200 JPEGs of 320x240
  noise, in two shards: each worker's ArrayRecord writer settles at a fixed
  buffer (about 18 MiB here) once a shard passes about 20 MiB, so both sizes
  start past it, and what is left to see is any growth with the input (about
  1% of it, measured; holding the input would be 100%). Each size runs twice
  and the lower sum counts, so that a process caught once in passing does not."""
  runs, sizes = [], []
  for n in (300, 1200):
    table, total = _noise_table(tmp_path / str(n), n, seed=n)
    tries = []
    for attempt in range(2):
      proc, marks = peaks([sys.executable, "-m", "trainer.cli", "prepare", str(table), "--out",
                           str(tmp_path / f"out{n}-{attempt}"), "--workers", "2",
                           "--num-shards", "2"])
      assert proc.returncode == 0, proc.stderr
      assert json.loads(proc.stdout.splitlines()[-1])["records"] == n
      tries.append(marks)
    runs.append(min(tries, key=peak_sum))
    sizes.append(total)
  extra = sizes[1] - sizes[0]
  assert extra > 100 << 20
  small, large = map(peak_sum, runs)
  shown = [sorted((round(most / 2**20, 1), name) for name, most in m.values()) for m in runs]
  assert large - small < 0.05 * extra, (small, large, sizes, shown)


def test_beam_runner_writes_what_the_local_runner_writes(tmp_path):
  pytest.importorskip("apache_beam")
  table, _ = _noise_table(tmp_path, 30, h=32, w=32)
  (tmp_path / "img" / "00007.jpg").write_bytes(b"not a jpeg")
  source = sources.open_source(str(table))
  local = prepare.prepare(source, str(tmp_path / "local"), num_shards=4, workers=2)
  beam = prepare.prepare(source, str(tmp_path / "beam"), num_shards=4, workers=2,
                         runner="beam")
  assert beam == local and local["records"] == 29 and local["skipped"] == {
      "not a readable image": 1}
  assert _shards(tmp_path / "beam") == _shards(tmp_path / "local")


def test_a_unit_carries_only_its_own_rows(tmp_path):
  """A worker is handed its unit's rows, not the whole table."""
  table, _ = _noise_table(tmp_path, 40, h=16, w=16)
  source = sources.open_source(str(table))
  units = prepare.sources.units(source, 8)
  assert [len(u.source) for u in units] == [5] * 8
  assert [rec for u in units for _, rec in u.read()] == [source[i] for i in range(40)]


def test_workers_do_not_import_the_main_script_again(tmp_path):
  """A script calling prepare: what it imports is imported once more in the
  forkserver, not once in every worker (a second each with Grain or JAX)."""
  table, _ = _noise_table(tmp_path, 16, h=16, w=16)
  log = tmp_path / "imports.txt"
  (tmp_path / "heavy.py").write_text(
      f"import os\nwith open({str(log)!r}, 'a') as f:\n  f.write(f'{{os.getpid()}}\\n')\n")
  (tmp_path / "script.py").write_text(
      "import sys\nimport heavy\nfrom pipeline import prepare, sources\n"
      "if __name__ == '__main__':\n"
      f"  prepare.prepare(sources.open_source({str(table)!r}), {str(tmp_path / 'out')!r},"
      " num_shards=4, workers=2)\n")
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
  proc = subprocess.run([sys.executable, str(tmp_path / "script.py")], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert len(log.read_text().split()) == 2  # the script and the forkserver


def test_a_killed_worker_stops_prepare_in_one_line(tmp_path):
  """A pool worker SIGKILLed midway (as the out-of-memory killer does): the
  pool would wait for its shard forever; prepare stops, says so, and the
  same command then writes the rest."""
  table, _ = _noise_table(tmp_path, 240)
  out = tmp_path / "out"
  args = ["prepare", str(table), "--workers", "2", "--num-shards", "8", "--out", str(out)]
  proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 120
    writing = []
    while not writing and time.monotonic() < deadline and proc.poll() is None:
      writing = [f for f in os.listdir(out / ".prepare") if ".array_record.tmp-" in f] \
          if (out / ".prepare").is_dir() else []
      time.sleep(0.002)
    assert writing, "no shard was being written"
    worker = int(writing[0].rsplit(".tmp-", 1)[1])  # a shard's temporary file names its writer
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 1, err
  assert err.strip().splitlines()[-1].startswith(
      f"capjax prepare: error: a worker process (pid {worker}) died midway"), err
  assert "Traceback" not in err
  again = run_capjax("prepare", *args[1:])
  assert "prepare: done, 240 records in 8 shards" in again.stderr
