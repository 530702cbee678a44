"""A process of a multi-process run dies (SIGKILL, through launch/local.sh,
2 processes x 4 devices): the other stops within --peer-timeout with one
line, no process of the run is left, the launcher exits non-zero, nothing of
the run stays in /dev/shm, and the rerun's losses are an uninterrupted run's."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import shm
from tests.conftest import REPO, Output, run_local, tiny_train_args

pytestmark = pytest.mark.xdist_group("peers")  # the module's runs share one worker

TIMEOUT = 10  # --peer-timeout, seconds
STEPS = 16


def _args(prepared, workdir):
  return [*tiny_train_args(workdir, prepared, f"--config.train.steps={STEPS}",
                           "--config.checkpoint.every_steps=4", "--config.data.worker_count=1"),
          f"--peer-timeout={TIMEOUT}"]


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _session(sid):
  """pid -> argv of the living (not zombie) processes in session `sid`."""
  found = {}
  for d in os.listdir("/proc"):
    if not d.isdigit():
      continue
    try:
      with open(f"/proc/{d}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      with open(f"/proc/{d}/cmdline") as f:
        argv = f.read().split("\0")[:-1]
    except OSError:  # gone meanwhile
      continue
    if int(fields[3]) == sid and fields[0] != "Z":
      found[int(d)] = argv
  return found


def _kill_one(prepared, workdir, victim, *overrides):
  """Starts the run, SIGKILLs process `victim` once the checkpoint at step 4
  is complete; (launcher's status, seconds from the kill to its exit, its
  output, the processes the run had, its session)."""
  proc = subprocess.Popen([os.path.join(REPO, "launch", "local.sh"), "2", "4",
                           *_args(prepared, workdir), *overrides], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True,
                          env={**os.environ, "CAPJAX_PYTHON": sys.executable})
  try:
    out = Output(proc)
    out.wait_for("[0] step 10/", 600)  # the save at 8 began, so the one at 4 is complete
    run = _session(proc.pid)
    target, = [p for p, argv in run.items() if argv[-2:] == ["--process-id", str(victim)]]
    os.kill(target, signal.SIGKILL)
    killed = time.monotonic()
    status = proc.wait(timeout=TIMEOUT + 60)
    return status, time.monotonic() - killed, out.rest(30), run, proc.pid
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)


def _assert_all_gone(run, sid):
  """Every process the run had (trainers, Grain workers, resource trackers,
  stderr guards, the launcher's) has exited, within a few seconds."""
  kinds = [" ".join(argv) for argv in run.values()]
  assert sum("trainer.cli" in k for k in kinds) == 2
  assert sum("spawn_main" in k for k in kinds) == 2  # one Grain worker each
  assert sum("resource_tracker" in k for k in kinds) == 2
  assert sum("trainer.stderr_guard" in k for k in kinds) == 2
  deadline = time.monotonic() + 15
  while _session(sid) and time.monotonic() < deadline:
    time.sleep(0.2)
  assert not _session(sid), _session(sid)


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run_local(2, 4, *_args(prepared, workdir))
  return _losses(workdir)


def test_a_dead_peer_stops_the_run_which_resumes_exactly(prepared, uninterrupted, tmp_path):
  status, took, out, run, sid = _kill_one(prepared, tmp_path, victim=1)
  assert status != 0, out
  assert took < TIMEOUT + 10, (took, out)
  assert "launch/local.sh: process 1 was killed by SIGKILL" in out
  line, = [l for l in out.splitlines() if "has not been heard from" in l]
  assert line.startswith("[0] capjax: process 1 of 2 has not been heard from for")
  assert "the last checkpoint is step" in line
  assert "Traceback" not in out and "stack trace" not in out, out
  _assert_all_gone(run, sid)
  assert not glob.glob(f"/dev/shm/*{shm.run_tag(str(tmp_path))}*")

  again = run_local(2, 4, *_args(prepared, tmp_path))
  assert "resuming from the checkpoint at step" in again.stdout
  assert _losses(tmp_path) == uninterrupted  # every step once, bit for bit
  assert not glob.glob(f"/dev/shm/*{shm.run_tag(str(tmp_path))}*")


def test_a_peer_killed_during_a_checkpoint_is_reported_as_a_lost_peer(prepared, tmp_path):
  """Killed as process 0 logs step 10, which it saves next: the save's
  collective fails at once (Gloo: connection reset by peer), and the line
  process 0 prints names the lost process, not disk space. Whether the kill
  meets the save is a race on a loaded machine: up to three tries, each
  checked as far as it goes, until one does (its errors.log says so)."""
  for attempt in range(3):
    workdir = tmp_path / str(attempt)
    status, took, out, run, sid = _kill_one(prepared, workdir, 1,
                                            "--config.checkpoint.every_steps=2")
    assert status != 0, out
    assert took < TIMEOUT + 20, (took, out)
    line, = [l for l in out.splitlines() if l.startswith("[0] capjax")]
    assert line.startswith("[0] capjax: process 1 of 2 has not been heard from for"), line
    assert "MiB" not in line and "room" not in line, line
    _assert_all_gone(run, sid)
    log = workdir / "logs" / "errors.log"
    if log.exists() and "a checkpoint save failed" in log.read_text():  # the kill met the save
      return
  pytest.fail("in three tries the kill never met a checkpoint save")


def test_a_dead_coordinator_stops_the_run_in_one_line(prepared, tmp_path):
  """Process 0 holds JAX's coordination service: without it JAX aborts the
  others at once; the console gets one line, the log the abort's trace."""
  status, took, out, run, sid = _kill_one(prepared, tmp_path, victim=0)
  assert status != 0, out
  assert took < TIMEOUT + 10, (took, out)
  line, = [l for l in out.splitlines() if "capjax: process 1 of 2" in l]
  assert line.startswith("[1] capjax: process 1 of 2 lost the run's coordinator (process 0, ")
  assert "stack trace" not in out and "Traceback" not in out, out
  with open(tmp_path / "logs" / "errors.log") as f:
    assert "Terminating process because the JAX distributed service" in f.read()
  _assert_all_gone(run, sid)
  assert not glob.glob(f"/dev/shm/*{shm.run_tag(str(tmp_path))}*")


def test_an_error_in_one_process_stops_the_others_at_once(prepared, tmp_path):
  """Process 1 cannot open its data; process 0, which can, stops too
  instead of waiting for it in the next collective."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

  def start(i, train):
    args = [*tiny_train_args(tmp_path, prepared, f"--config.data.train={train}"),
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
            f"--peer-timeout={TIMEOUT}"]
    return subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  good, bad = start(0, prepared["train"]), start(1, tmp_path / "nowhere")
  _, bad_err = bad.communicate(timeout=120)
  failed = time.monotonic()
  _, good_err = good.communicate(timeout=120)
  assert bad.returncode == 1 and "nowhere: no such file or directory" in bad_err
  assert good.returncode == 75, good_err
  assert time.monotonic() - failed < 5 + TIMEOUT / 2
  line, = [l for l in good_err.splitlines() if l.startswith("capjax:")]
  assert line.startswith("capjax: process 1 of 2 failed: FileNotFoundError: ")
  assert line.endswith("stopping process 0 of 2; its error says what to mend")
