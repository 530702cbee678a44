"""Shared fixtures: a small synthetic dataset, prepared once per session,
and one short training run that tests only read.

The suite runs on several pytest-xdist workers (`make test`), then the
tests marked `serial` alone; what a session makes once, the first worker to
need it makes, and the others wait for it. Every `capjax` command the tests
run (and these processes) compile through one persistent JAX compilation
cache for the session: the many short runs of the same tiny models compile
each program once.
"""

import atexit
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "tests", "tiny_config.py")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # before JAX is imported
  _cache = tempfile.mkdtemp(prefix="capjax-tests-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  # Programs that compile faster than this are not worth a cache entry
  # (eager operations among them: thousands of them in the in-process tests).
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  # A size limit turns on the cache's file lock: processes share it safely.
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)


def pytest_configure(config):
  config.addinivalue_line("markers", "serial: reads machine-wide state (all of /dev/shm, "
                          "say) that tests running beside it change; `make test` runs these "
                          "after the others, alone")


@pytest.fixture(autouse=True, scope="session")
def _absl_flags_parsed():
  """As `capjax` does: Grain reads absl flags, which nothing here parses.
  Whichever test of a worker comes first, the flags are ready."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def run_capjax(*args, check=True, env=None, timeout=600, clean_env=None, cwd=REPO):
  """Runs the real `capjax` command in a subprocess; returns the CompletedProcess.
  `env` adds to the environment (`clean_env`, or this process's)."""
  proc = subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout,
                        env={**(os.environ if clean_env is None else clean_env), **(env or {})})
  if check and proc.returncode != 0:
    raise AssertionError(f"capjax {' '.join(args)} exited {proc.returncode}:\n"
                         f"{proc.stdout}\n{proc.stderr}")
  return proc


def run_local(n, m, *args, timeout=900):
  """`launch/local.sh N M ARGS...`: N processes on localhost, M CPU devices each."""
  proc = subprocess.run([os.path.join(REPO, "launch", "local.sh"), str(n), str(m), *args],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "CAPJAX_PYTHON": sys.executable})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


def run_and_kill(args, text: str, env=None, timeout: float = 600) -> None:
  """`capjax ARGS` in a process group of its own (its workers with it),
  SIGKILLed whole once a line of its output holds `text`."""
  proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True, env={**os.environ, **(env or {})})
  try:
    Output(proc).wait_for(text, timeout)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(30)


class Output:
  """A child's stdout (text, stderr merged in or not), read by a thread of
  its own so that every wait on it is bounded: a child that hangs fails the
  test with its last lines instead of hanging the suite."""

  def __init__(self, proc: subprocess.Popen):
    self.proc, self.lines = proc, []
    self._done = False
    self._cond = threading.Condition()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      with self._cond:
        self.lines.append(line)
        self._cond.notify_all()
    with self._cond:
      self._done = True
      self._cond.notify_all()

  @property
  def text(self) -> str:
    with self._cond:
      return "".join(self.lines)

  def _tail(self) -> str:
    return "".join(self.lines[-40:])

  def wait_for(self, text: str, timeout: float) -> str:
    """Until a line holds `text` (returns it); AssertionError with the last
    output if the child ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    with self._cond:
      while True:
        found = [line for line in self.lines if text in line]
        if found:
          return found[0]
        if self._done:
          raise AssertionError(f"the child exited ({self.proc.poll()}) without printing "
                               f"{text!r}; its last output:\n{self._tail()}")
        left = deadline - time.monotonic()
        if left <= 0:
          raise AssertionError(f"the child printed no {text!r} in {timeout:g} s; its last "
                               f"output:\n{self._tail()}")
        self._cond.wait(left)

  def rest(self, timeout: float) -> str:
    """All of the output once the child has closed it (at most `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    with self._cond:
      while not self._done:
        left = deadline - time.monotonic()
        if left <= 0:
          raise AssertionError(f"the child's output did not end in {timeout:g} s; its last "
                               f"output:\n{self._tail()}")
        self._cond.wait(left)
      return "".join(self.lines)


def _session_folder(tmp_path_factory, name, make):
  """`make(folder)` once per test session, whichever worker asks first; the
  others wait for it and get the same folder."""
  from filelock import FileLock

  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's folder, above each worker's own
  folder = root / name
  with FileLock(str(folder) + ".lock"):
    if not (folder / ".done").exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      make(folder)
      (folder / ".done").touch()
  return folder


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
  from pipeline import synthetic

  def make(folder):
    synthetic.generate(str(folder / "coco"), num_train=96, num_val=20, side=48, seed=1,
                       processes=2)

  return _session_folder(tmp_path_factory, "synthetic", make) / "coco"


@pytest.fixture(scope="session")
def prepared(synthetic_coco, tmp_path_factory):
  """{split: prepared folder} for the small synthetic set."""
  def make(folder):
    for split in ("train", "val"):
      run_capjax("prepare", str(synthetic_coco / "annotations" / f"captions_{split}.json"),
                 "--images", str(synthetic_coco / split), "--out", str(folder / split),
                 "--num-shards", "3")

  root = _session_folder(tmp_path_factory, "prepared", make)
  return {split: str(root / split) for split in ("train", "val")}


def tiny_train_args(workdir, prepared, *overrides):
  """`capjax train`'s arguments for the tiny config on the prepared set,
  constant learning rate."""
  return ["train", "--config", TINY_CONFIG, "--workdir", str(workdir),
          f"--config.data.train={prepared['train']}", f"--config.data.eval={prepared['val']}",
          "--config.train.schedule=constant", *overrides]


def train_tiny(workdir, prepared, *overrides, check=True):
  return run_capjax(*tiny_train_args(workdir, prepared, *overrides), check=check)


@pytest.fixture(scope="session")
def trained_run(prepared, tmp_path_factory):
  """Ten steps of the tiny config (checkpoints at 9 and 10), trained once a
  session; tests read it and write nothing into it but eval outputs."""
  def make(folder):
    train_tiny(folder, prepared, "--config.train.steps=10", "--config.train.peak_flops=1e12")

  return _session_folder(tmp_path_factory, "trained_run", make)
