import json

import pytest

from tests.conftest import run_capjax

COMMANDS = ["prepare", "train", "eval", "predict", "metrics", "import-hf", "export-hf"]


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
    (["metrics", "--predictions", "/no/such.jsonl", "--references", "/no/refs.json"],
     "/no/such.jsonl"),
    (["train", "--config", "demo", "--workdir", "/tmp/x", "--config.train.nope=1"],
     "config.train.nope"),
])
def test_bad_input_is_one_line_and_nonzero(args, words):
  proc = run_capjax(*args, check=False)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and words in lines[0], proc.stderr


@pytest.mark.parametrize("args, words", [
    (["train", "--config", "demo", "--workdir", "hdfs://host/run"],
     "--workdir hdfs://host/run: hdfs:// paths are not supported: give a local path, "
     "gs://BUCKET/... or s3://BUCKET/..."),
    (["prepare", "tests/data/no.json", "--images", "gs://bucket/images", "--out", "gs://b/d"],
     "--images gs://bucket/images: gs:// paths are not supported here"),
    (["train", "--config", "demo", "--workdir", "/tmp/x",
      "--config.data.train=[('gs://b/a', 1.0), ('hdfs://h/b', 1.0)]"],
     "config.data.train hdfs://h/b: hdfs://"),
    (["eval", "--checkpoint", "http://host/run"], "--checkpoint http://host/run"),
    (["export-hf", "s3://bucket/run", "--out", "ftp://host/hf"], "--out ftp://host/hf"),
    (["metrics", "--predictions", "/p.jsonl", "--references", "https://host/refs.json"],
     "--references https://host/refs.json: https://"),
])
def test_a_url_is_refused_not_taken_for_a_local_folder(args, words, tmp_path):
  proc = run_capjax(*args, check=False, cwd=tmp_path)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1 and words in lines[0], proc.stderr
  assert not list(tmp_path.iterdir())  # no folder named s3: or gs:


def test_metrics_scores_prediction_files(tmp_path):
  from trainer.metrics import caption_metrics

  preds = tmp_path / "p.jsonl"
  preds.write_text('{"image": "val/a.jpg", "caption": "A man riding a wave."}\n'
                   '{"image": "val/b.jpg", "caption": "two dogs in the snow"}\n')
  refs = {"a.jpg": ["A surfer rides a big wave.", "a man on a surfboard"],
          "b.jpg": ["Two dogs play in the snow.", "dogs running through snow"]}
  coco = tmp_path / "captions.json"
  coco.write_text(json.dumps({
      "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
      "annotations": [{"image_id": 7 if k == "a.jpg" else 9, "caption": c}
                      for k, cs in refs.items() for c in cs]}))
  plain = tmp_path / "refs.json"
  plain.write_text(json.dumps(refs))
  want = caption_metrics.score(["A man riding a wave.", "two dogs in the snow"], list(refs.values()))
  for ref_file in (coco, plain):
    out = tmp_path / "scores.json"
    proc = run_capjax("metrics", "--predictions", str(preds), "--references", str(ref_file),
                      "--no-meteor", "--rouge-score", "--out", str(out))
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == got
    assert got["images"] == 2 and set(got) >= {"rouge1", "rouge2", "rouge_lsum"}
    for k, v in want.items():
      assert got[k] == pytest.approx(v, abs=1e-12)
  # an image of the references without a prediction is an error, not a smaller score
  plain.write_text(json.dumps({**refs, "c.jpg": ["a cat"]}))
  proc = run_capjax("metrics", "--predictions", str(preds), "--references", str(plain),
                    "--no-meteor", check=False)
  assert proc.returncode == 1 and "no prediction for 1 image(s)" in proc.stderr
