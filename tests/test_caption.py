"""`capjax caption` on the synthetic images written as img2dataset tars (a
bad image, a sample without a caption, the last tar cut short) and as
Parquet: `predict`'s captions, skipped samples counted, a killed run
resumed byte for byte, and two hosts writing what one writes."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, Output, run_capjax

# One worker runs the module: its module-scoped runs are made once.
pytestmark = pytest.mark.xdist_group("caption")

TARS, PER_TAR = 5, 6
BAD = b"these bytes are not an image"


def _samples(synthetic_coco):
  with open(synthetic_coco / "annotations" / "captions_train.json") as f:
    coco = json.load(f)
  caps = {}
  for a in coco["annotations"]:
    caps.setdefault(a["image_id"], a["caption"])
  return [(f"{i:09d}", synthetic_coco / "train" / im["file_name"], caps[im["id"]])
          for i, im in enumerate(coco["images"][:TARS * PER_TAR])]


def _tar(path, members):
  with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size, info.mtime = len(data), 1_700_000_000
      tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(synthetic_coco, tmp_path_factory):
  """TARS tars of PER_TAR samples: in 00000.tar one bad image, in 00001.tar
  one sample without a caption, and the last tar cut inside its last image.
  Returns the folder and the images expected captioned, by key."""
  folder = tmp_path_factory.mktemp("shards")
  samples = _samples(synthetic_coco)
  expected = {}
  for t in range(TARS):
    members = []
    for key, path, caption in samples[t * PER_TAR:(t + 1) * PER_TAR]:
      data = BAD if key == "000000002" else path.read_bytes()
      members.append((f"{key}.jpg", data))
      if key != "000000007":
        members.append((f"{key}.txt", caption.encode()))
      members.append((f"{key}.json", json.dumps({"key": key}).encode()))
      if key != "000000002":
        expected[key] = (str(path), "" if key == "000000007" else caption)
    _tar(folder / f"{t:05d}.tar", members)
  last = folder / f"{TARS - 1:05d}.tar"
  data = last.read_bytes()
  cut = data.rindex(samples[-1][1].read_bytes()[:64])  # inside the last image
  last.write_bytes(data[:cut + 100])
  del expected[samples[-1][0]]
  return folder, expected


def _caption(trained_run, sources, out, *extra, **kw):
  return run_capjax("caption", *map(str, sources), "--checkpoint", str(trained_run), "--out",
                    str(out), "--batch-size", "4", "--num-beams", "2", *extra, **kw)


@pytest.fixture(scope="module")
def captioned(trained_run, shards, tmp_path_factory):
  out = tmp_path_factory.mktemp("captioned")
  proc = _caption(trained_run, [shards[0]], out)
  return out, proc


def _files(out):
  return {n: (out / n).read_bytes() for n in sorted(os.listdir(out)) if n.endswith(".parquet")}


def test_captions_are_predicts_and_skipped_samples_are_counted(trained_run, shards, captioned,
                                                              tmp_path):
  folder, expected = shards
  out, proc = captioned
  assert sorted(_files(out)) == [f"{t:05d}.parquet" for t in range(TARS)]
  rows = pa.concat_tables([pq.read_table(out / n) for n in sorted(_files(out))]).to_pylist()
  assert [r["key"] for r in rows] == sorted(expected)
  assert {r["key"]: r["org_caption"] for r in rows} == {k: v[1] for k, v in expected.items()}
  assert all(r["step"] == 10 and -30 < r["logprob"] < 0 for r in rows)
  run_capjax("predict", *(expected[k][0] for k in sorted(expected)), "--checkpoint",
             str(trained_run), "--output", str(tmp_path / "p.jsonl"), "--num-beams", "2")
  predicted = [json.loads(l)["caption"] for l in open(tmp_path / "p.jsonl")]
  assert [r["caption"] for r in rows] == predicted
  manifest = json.load(open(out / "manifest.json"))
  assert manifest["finished"] == manifest["units"] == TARS
  assert manifest["captioned"] == len(expected)
  assert sum(manifest["skipped"].values()) == 1
  assert list(manifest["truncated"]) == [str(folder / f"{TARS - 1:05d}.tar")]
  assert "00004.parquet (5 captioned, 0 skipped, truncated)" in proc.stderr


def test_a_killed_run_resumes_byte_for_byte(trained_run, shards, tmp_path):
  """SIGKILL once the first unit is written; the same command again writes
  the rest and keeps what was written; the files equal an uninterrupted
  run's (with the same batch size: one image a batch, so that the kill
  lands while units remain)."""
  folder, _ = shards
  cmd = [sys.executable, "-m", "trainer.cli", "caption", str(folder), "--checkpoint",
         str(trained_run), "--out", str(tmp_path), "--batch-size", "1", "--num-beams", "2"]
  child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
  out = Output(child)
  try:
    out.wait_for("wrote 00000.parquet", timeout=300)
    child.send_signal(signal.SIGKILL)
  finally:
    child.kill()
    child.wait(timeout=60)
  first = _files(tmp_path)
  assert "00000.parquet" in first and len(first) < TARS, "the run ended before the kill"
  kept = {n: os.stat(tmp_path / n).st_mtime_ns for n in first}
  proc = _caption(trained_run, [folder], tmp_path, "--batch-size", "1")
  assert f"{len(first)} already written, kept" in proc.stderr
  assert {n: os.stat(tmp_path / n).st_mtime_ns for n in first} == kept
  _caption(trained_run, [folder], tmp_path / "whole", "--batch-size", "1")
  assert _files(tmp_path) == _files(tmp_path / "whole")
  assert not [n for n in os.listdir(tmp_path / ".caption") if ".tmp-" in n]


def test_two_hosts_write_what_one_writes(trained_run, shards, captioned, tmp_path):
  folder, _ = shards
  procs = [subprocess.Popen(
      [sys.executable, "-m", "trainer.cli", "caption", str(folder), "--checkpoint",
       str(trained_run), "--out", str(tmp_path), "--batch-size", "4", "--num-beams", "2",
       "--process-count", "2", "--process-index", str(i)], cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert "host 0 of 2: 3 of 5 units" in logs[0] and "host 1 of 2: 2 of 5 units" in logs[1]
  assert _files(tmp_path) == _files(captioned[0])


def test_parquet_sources_and_bad_input(trained_run, shards, captioned, tmp_path):
  """The same images as an img2dataset Parquet file: the same captions; an
  empty source, a checkpoint without its tokenizer and a bad --process-index
  are refused in one line."""
  _, expected = shards
  keys = sorted(expected)
  table = pa.table({"key": keys, "jpg": [open(expected[k][0], "rb").read() for k in keys],
                    "txt": [expected[k][1] for k in keys]})
  os.makedirs(tmp_path / "pq")
  pq.write_table(table, tmp_path / "pq" / "part-0.parquet")
  _caption(trained_run, [tmp_path / "pq"], tmp_path / "out")
  got = pq.read_table(tmp_path / "out" / "part-0.parquet").to_pylist()
  rows = pa.concat_tables([pq.read_table(captioned[0] / n)
                           for n in sorted(_files(captioned[0]))]).to_pylist()
  assert [(r["key"], r["caption"]) for r in got] == [(r["key"], r["caption"]) for r in rows]
  os.makedirs(tmp_path / "empty")
  import shutil
  shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("tokenizer"))
  for source, extra, message in ((tmp_path / "empty", (), "empty"),
                                 (tmp_path / "pq", ("--checkpoint", str(tmp_path / "run")),
                                  "no tokenizer folder"),
                                 (tmp_path / "pq", ("--process-index", "2", "--process-count",
                                                    "2"), "need 0 <= index < count")):
    proc = _caption(trained_run, [source], tmp_path / "x", *extra, check=False)
    assert proc.returncode == 1 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_sampled_captions_are_the_same_on_every_run(trained_run, shards, captioned, tmp_path):
  """--sample: each image's draws come from --seed and its key, so another
  run (here in batches of another size) draws the same captions; another
  seed draws others, and the settings are part of what a rerun compares."""
  folder, _ = shards
  sample = ("--sample", "--temperature", "1.5", "--top-p", "0.9")
  runs = {}
  for name, extra in (("a", ("--seed", "3")), ("b", ("--seed", "3", "--batch-size", "3")),
                      ("c", ("--seed", "4"))):
    _caption(trained_run, [folder], tmp_path / name, *sample, *extra)
    runs[name] = pa.concat_tables([pq.read_table(tmp_path / name / n)
                                   for n in sorted(_files(tmp_path / name))]).to_pylist()
  caps = {k: [r["caption"] for r in rows] for k, rows in runs.items()}
  beams = [r["caption"] for r in pa.concat_tables(
      [pq.read_table(captioned[0] / n) for n in sorted(_files(captioned[0]))]).to_pylist()]
  assert caps["a"] == caps["b"] and caps["a"] != caps["c"] and caps["a"] != beams
  assert all(r["logprob"] < 0 for r in runs["a"])


def test_prepare_trains_on_the_new_captions(shards, captioned, tmp_path):
  """`prepare --captions OUT`: the tars' images with the captions caption
  wrote for them, the images it skipped left out."""
  from pipeline import records
  folder, expected = shards
  out, _ = captioned
  run_capjax("prepare", str(folder), "--captions", str(out), "--out", str(tmp_path / "p"))
  source = records.PreparedSource(str(tmp_path / "p"))
  got = {source[i]["id"]: source[i]["captions"] for i in range(len(source))}
  rows = pa.concat_tables([pq.read_table(out / n) for n in sorted(_files(out))]).to_pylist()
  assert got == {r["key"]: [r["caption"]] for r in rows} and len(got) == len(expected)
  proc = run_capjax("prepare", str(folder), "--captions", str(tmp_path), "--out",
                    str(tmp_path / "q"), check=False)
  assert proc.returncode == 1 and "no 00000.parquet for" in proc.stderr


def test_several_captions_per_image(trained_run, shards, captioned, tmp_path):
  """--num-return: the N best beams (the first the caption itself, as the
  run with one gives it), or N draws; more than the beams is refused."""
  folder, _ = shards
  _caption(trained_run, [folder], tmp_path / "beams", "--num-return", "2")
  _caption(trained_run, [folder], tmp_path / "draws", "--num-return", "3", "--sample",
           "--temperature", "2.0")
  beams, draws, one = ([r for n in sorted(_files(d)) for r in pq.read_table(d / n).to_pylist()]
                       for d in (tmp_path / "beams", tmp_path / "draws", captioned[0]))
  assert [r["caption"] for r in beams] == [r["caption"] for r in one]
  assert all(len(r["captions"]) == len(r["logprobs"]) == 2 and r["captions"][0] == r["caption"]
             and r["logprobs"][0] == r["logprob"] for r in beams)
  assert any(r["captions"][0] != r["captions"][1] for r in beams)
  assert all(len(r["captions"]) == 3 and r["captions"][0] == r["caption"] for r in draws)
  assert any(len(set(r["captions"])) > 1 for r in draws)
  proc = _caption(trained_run, [folder], tmp_path / "x", "--num-return", "3", check=False)
  assert proc.returncode == 1 and "at most --num-beams (2)" in proc.stderr


def test_each_host_finds_its_share(monkeypatch):
  """--process-index/--process-count, else SLURM's, a TPU VM's or a
  Kubernetes indexed Job's environment."""
  from trainer.caption import host_share
  for var in ("SLURM_PROCID", "SLURM_NTASKS", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES",
              "JOB_COMPLETION_INDEX"):
    monkeypatch.delenv(var, raising=False)
  assert host_share(None, None) == (0, 1) and host_share(2, 3) == (2, 3)
  monkeypatch.setenv("TPU_WORKER_ID", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b,c,d")
  assert host_share(None, None) == (1, 4) and host_share(3, None) == (3, 4)
  monkeypatch.delenv("TPU_WORKER_ID")
  monkeypatch.setenv("SLURM_PROCID", "5")
  monkeypatch.setenv("SLURM_NTASKS", "8")
  assert host_share(None, None) == (5, 8)
  monkeypatch.delenv("SLURM_PROCID")
  monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
  assert host_share(None, 4) == (2, 4)
  with pytest.raises(ValueError, match="--process-count: needed in a Kubernetes"):
    host_share(None, None)
  with pytest.raises(ValueError, match="need 0 <= index < count"):
    host_share(4, 4)
