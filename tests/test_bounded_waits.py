"""No test can hang the suite: a wait on a child's output is bounded and
names what the child last said; a test that hangs anyway fails at the
suite's ceiling (pytest.ini) and the tests after it still run."""

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, Output

HANGS = "import time; print('loading the model', flush=True); time.sleep(120)"


def test_a_child_that_hangs_fails_the_wait_naming_its_last_output():
  proc = subprocess.Popen([sys.executable, "-c", HANGS], stdout=subprocess.PIPE, text=True)
  try:
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"printed no 'step 10/' in 2 s; its last "
                       r"output:\n(.|\n)*loading the model"):
      Output(proc).wait_for("step 10/", 2)
    assert time.monotonic() - start < 10
  finally:
    proc.kill()
    proc.wait(10)


def test_a_hung_test_fails_at_the_ceiling_and_the_suite_goes_on(tmp_path):
  (tmp_path / "test_hang.py").write_text(
      "import subprocess, sys\n"
      f"def test_hangs():\n  subprocess.run([sys.executable, '-c', {HANGS!r}])\n"
      "def test_after():\n  pass\n")
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
       os.path.join(REPO, "pytest.ini"), "--rootdir", str(tmp_path), "-o", "timeout=3",
       str(tmp_path / "test_hang.py")],
      capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert time.monotonic() - start < 60
  assert "Timeout (>3.0s) from pytest-timeout" in proc.stdout, proc.stdout
  assert "1 failed, 1 passed" in proc.stdout, proc.stdout


def test_the_suite_has_a_ceiling(request):
  assert float(request.config.getini("timeout")) == 600
