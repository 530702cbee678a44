import pytest

from tests.conftest import run_capjax

COMMANDS = ["prepare", "train", "eval", "predict", "import-hf", "export-hf"]


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help(command):
  proc = run_capjax(*([command] if command else []), "--help")
  assert proc.returncode == 0 and "usage: capjax" in proc.stdout


@pytest.mark.parametrize("args, words", [
    (["train", "--config", "demo", "--workdir", "/tmp/x", "--bogus"], "unrecognized arguments"),
    (["frobnicate"], "invalid choice"),
    (["prepare", "/no/such/file.json", "--out", "/tmp/x"], "/no/such/file.json"),
    (["eval", "--checkpoint", "/no/such/run"], "/no/such/run"),
    (["predict", "--checkpoint", "/no/such/run", "/no/such.jpg", "--output", "/tmp/p.jsonl"],
     "/no/such.jpg"),
    (["train", "--config", "no_such_config", "--workdir", "/tmp/x"], "no_such_config"),
    (["export-hf", "/no/such/run", "--out", "/tmp/x"], "/no/such/run"),
    (["import-hf", "--encoder", "/no/such/vit", "--out", "/tmp/x"], "/no/such/vit"),
    (["train", "--config", "demo", "--workdir", "/tmp/x", "--config.train.nope=1"],
     "config.train.nope"),
])
def test_bad_input_is_one_line_and_nonzero(args, words):
  proc = run_capjax(*args, check=False)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and words in lines[0], proc.stderr
