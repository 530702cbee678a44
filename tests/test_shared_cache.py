"""Local stages and the data cache on a home folder that several processes
and hosts share (NFS on SLURM and many GPU clusters): nothing of a live
process is removed, and a dataset is copied once."""

import os
import subprocess
import sys

import pytest

from tests import buckets
from tests.conftest import REPO, Output


def _dead_pid() -> int:
  """A PID no process of this host has."""
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def test_a_process_removes_only_its_own_hosts_dead_stages(tmp_path, monkeypatch):
  """Two hosts, a and b, share the cache: a's process removes a stage of a
  dead process of a, never one of b's (whose PID means nothing on a), nor
  a live one of a's."""
  from pipeline import fs
  monkeypatch.setenv("CAPJAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CAPJAX_HOST", "host-a")
  dead = _dead_pid()
  parent = fs.local_twin("s3://bucket/run")
  names = {"dead_a": f"stage-host-a_{dead}-x1", "live_a": f"stage-host-a_{os.getppid()}-x2",
           "b": f"stage-host-b_{dead}-x3", "b_dotted": f"stage-b.example.com_{dead}-x4",
           "unknown": f"stage-{dead}-x5"}
  for name in names.values():
    os.makedirs(os.path.join(parent, name, "metrics"))
  stage = fs.Stage("s3://bucket/run")
  assert os.path.basename(stage.root).startswith(f"stage-host-a_{os.getpid()}-")
  left = set(os.listdir(parent))
  assert names["dead_a"] not in left
  assert {names["live_a"], names["b"], names["b_dotted"], names["unknown"]} <= left

  monkeypatch.setenv("CAPJAX_HOST", "host-b")  # b's next process takes its own dead one
  fs.Stage("s3://bucket/run")
  assert names["b"] not in os.listdir(parent) and stage.root in [
      os.path.join(parent, n) for n in os.listdir(parent)]


RACE = """
import sys
from pipeline import records
source = records.PreparedSource(sys.argv[1])
print(len(source), source.paths[0], flush=True)
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
  with buckets.s3_server() as env:
    yield buckets.scrubbed(env)


def test_two_hosts_racing_for_the_data_cache_copy_it_once(s3, prepared, tmp_path, monkeypatch):
  """Two processes on two hosts sharing one cache open the same s3:// data
  while a third holds the cache folder: both wait; released, one copies
  the data, the other then finds it complete; both read every record, and
  nothing partial is left."""
  from pipeline import data_cache, fs, records
  for k, v in {**s3, "CAPJAX_CACHE": str(tmp_path / "cache"), "CAPJAX_HOST": "host-c"}.items():
    monkeypatch.setenv(k, v)
  buckets.forget_clients()
  folder = f"s3://{buckets.BUCKET}/{tmp_path.name}/val"
  fs.copytree(prepared["val"], folder)
  buckets.forget_clients()
  local = fs.local_twin(folder, "data")
  os.makedirs(local)
  procs = []
  try:
    with data_cache._locked(local, "test"):
      for host in ("host-a", "host-b"):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", RACE, folder], cwd=REPO, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env={**os.environ, "CAPJAX_HOST": host},
            start_new_session=True))
      outs = [Output(proc) for proc in procs]
      for out in outs:
        assert "held by" not in out.wait_for(f"waiting for process host-c_{os.getpid()}", 120)
    texts = [out.rest(120) for out in outs]
    assert [proc.wait(30) for proc in procs] == [0, 0], texts
  finally:
    for proc in procs:
      proc.kill()
  n = len(records.PreparedSource(prepared["val"]))
  assert [t.splitlines()[-1].split()[0] for t in texts] == [str(n), str(n)], texts
  assert "".join(texts).count("copying 3 files") == 1, texts
  for name in os.listdir(prepared["val"]):
    if records.is_shard(name):
      with open(os.path.join(prepared["val"], name), "rb") as a, \
           open(os.path.join(local, name), "rb") as b:
        assert a.read() == b.read(), name
  assert not [n for n in os.listdir(local) if ".tmp-" in n]
