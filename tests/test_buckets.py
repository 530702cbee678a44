"""Data and run directories in buckets, against real servers on 127.0.0.1:
moto's S3 server and gcp-storage-emulator, reached by the real clients
(TensorStore, ArrayRecord's GCS reader, gcsfs, s3fs) through their
documented endpoint settings."""

import errno
import json
import os
import select
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import buckets
from tests.conftest import REPO, TINY_CONFIG, Output, run_capjax, tiny_train_args

# Distinctive, so that a copy of one anywhere in the run directory is found.
SECRET = "capjax-secret-9d2e41"
SERVERS = {"gs": buckets.gcs_server, "s3": buckets.s3_server}


@pytest.fixture(scope="module", params=sorted(SERVERS))
def store(request, tmp_path_factory):
  """(scheme, the environment capjax runs with) for one server, up for the
  module; capjax's local stages and logs in a folder of the test's."""
  with SERVERS[request.param]() as env:
    key = "GOOGLE_AUTH_TOKEN_FOR_TESTING" if request.param == "gs" else "AWS_SECRET_ACCESS_KEY"
    cache = str(tmp_path_factory.mktemp(f"cache-{request.param}"))
    yield request.param, buckets.scrubbed({**env, key: SECRET, "CAPJAX_CACHE": cache})


@pytest.fixture
def client(store, monkeypatch):
  """This process's fs layer pointed at the store's server."""
  for k, v in store[1].items():
    monkeypatch.setenv(k, v)
  buckets.forget_clients()
  from pipeline import fs
  yield fs
  buckets.forget_clients()


def _capjax(env, *args, check=True):
  return run_capjax(*args, check=check, clean_env=env, timeout=600)


def _losses(fs, workdir):
  rows = [json.loads(l) for l in fs.read_text(fs.join(workdir, "metrics.jsonl")).splitlines()]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _local_losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _prepare_killed_then_finished(env, fs, coco, images, out):
  """The train split prepared into `out` with one worker, SIGKILLed while its
  last shard waits for an image (a FIFO no one writes): the folder is not
  taken for a dataset; run again, prepare writes that shard alone."""
  from pipeline import records
  ann = coco / "annotations" / "captions_train.json"
  images.mkdir()
  for p in (coco / "train").iterdir():
    (images / p.name).symlink_to(p)
  last = json.loads(ann.read_text())["images"][-1]["file_name"]  # in the last shard
  (images / last).unlink()
  os.mkfifo(images / last)
  args = ["prepare", str(ann), "--images", str(images), "--out", out, "--num-shards", "3",
          "--workers", "1"]
  proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  written = fs.join(out, ".prepare", "data-00001-of-00003.json")  # shard 1's counts
  deadline = time.time() + 120
  while not fs.exists(written) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert fs.exists(written) and not fs.exists(fs.join(out, records.MANIFEST))
  with pytest.raises(FileNotFoundError, match="did not finish"):
    records.PreparedSource(out)
  (images / last).unlink()
  (images / last).symlink_to(coco / "train" / last)
  again = _capjax(env, *args)
  assert "2 of 3 shards already written, kept" in again.stderr, again.stderr


def _tensors(folder):
  from safetensors.numpy import load_file
  return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def local_export(trained_run, tmp_path_factory):
  out = tmp_path_factory.mktemp("local-export") / "hf"
  run_capjax("export-hf", str(trained_run), "--out", str(out))
  return out


def test_a_run_in_a_bucket_from_prepare_to_export_matches_a_local_one(
    store, client, synthetic_coco, prepared, trained_run, local_export, tmp_path):
  """Data prepared into the bucket (one prepare killed midway, then
  finished) holds the local prepared folder's shards byte for byte. A run
  on it there, SIGKILLed after a checkpoint (a step left half-written beside
  it) and resumed to 10, has the per-step losses of an uninterrupted local
  run bit for bit, so the same global batches; eval writes its outputs
  there; export-hf to the bucket gives the local export's weights, and
  import-hf of that folder into the bucket exports them again."""
  from pipeline import records
  scheme, env = store
  fs = client
  root = f"{scheme}://{buckets.BUCKET}/{tmp_path.name}"
  data = {"train": f"{root}/data/train", "val": f"{root}/data/val"}
  _prepare_killed_then_finished(env, fs, synthetic_coco, tmp_path / "images", data["train"])
  _capjax(env, "prepare", str(synthetic_coco / "annotations" / "captions_val.json"), "--images",
          str(synthetic_coco / "val"), "--out", data["val"], "--num-shards", "3")
  for split, folder in data.items():
    names = [n for n in fs.listdir(folder) if records.is_shard(n)]
    assert names == [n for n in sorted(os.listdir(prepared[split])) if records.is_shard(n)]
    for name in names:
      with open(os.path.join(prepared[split], name), "rb") as f:
        assert fs.read_bytes(fs.join(folder, name)) == f.read(), (split, name)

  workdir = f"{root}/run"
  proc = subprocess.Popen(
      [sys.executable, "-m", "trainer.cli",
       *tiny_train_args(workdir, data, "--config.train.steps=100000",
                        "--config.checkpoint.every_steps=3")],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)
  out = Output(proc)
  try:
    out.wait_for("step 10/", 300)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(30)
  from trainer import faults
  steps = faults.committed_steps(workdir)
  assert steps and max(steps) >= 3, out.text
  # What a save killed midway leaves: a step's files without its commit marker.
  marker = {"gs": faults.GCS_COMMIT, "s3": faults.S3_COMMIT}[scheme]
  ckpts = fs.join(workdir, "checkpoints")
  for name in fs.files(fs.join(ckpts, str(max(steps)))):
    if os.path.basename(name) != marker:
      fs.copy(fs.join(ckpts, str(max(steps)), name), fs.join(ckpts, "99", name))
  assert faults.committed_steps(workdir) == steps

  again = _capjax(env, *tiny_train_args(workdir, data, "--config.train.steps=10"))
  assert f"resuming from the checkpoint at step {max(steps)}" in again.stdout, again.stdout
  assert _losses(fs, workdir) == _local_losses(trained_run)
  assert any(n.startswith("events.out.tfevents") for n in fs.listdir(fs.join(workdir,
                                                                           "tensorboard")))
  assert faults.committed_steps(workdir) == [9, 10]  # keep = 2; 99 was never one

  evaluated = _capjax(env, "eval", "--checkpoint", workdir)
  assert "BLEU-4" in evaluated.stdout
  metrics = json.loads(fs.read_text(fs.join(workdir, "eval_metrics.json")))
  assert metrics["step"] == 10 and metrics["images"] == 20
  assert fs.isfile(fs.join(workdir, "samples.html"))
  assert len(fs.read_text(fs.join(workdir, "eval_predictions.jsonl")).splitlines()) == 20

  _capjax(env, "export-hf", workdir, "--out", f"{root}/hf")
  out = tmp_path / "hf"
  fs.copytree(f"{root}/hf", str(out))
  mine, local = _tensors(out), _tensors(local_export)
  assert sorted(mine) == sorted(local)
  for k in local:
    assert np.array_equal(mine[k], local[k]), k
  from transformers import VisionEncoderDecoderModel
  VisionEncoderDecoderModel.from_pretrained(str(out))

  imported = f"{root}/imported"
  _capjax(env, "import-hf", str(out), "--out", imported, "--config", TINY_CONFIG)
  assert faults.committed_steps(imported) == [0]
  refused = _capjax(env, "import-hf", str(out), "--out", imported, check=False)
  assert refused.returncode == 1 and "holds files already" in refused.stderr, refused.stderr
  _capjax(env, "export-hf", imported, "--out", str(tmp_path / "again"))
  again = _tensors(tmp_path / "again")
  for k in local:
    assert np.array_equal(again[k], local[k]), k

  # Each process's stage went with it (the killed one's when the next started).
  runs = os.path.join(env["CAPJAX_CACHE"], "runs")
  assert not [n for d in os.listdir(runs) for n in os.listdir(os.path.join(runs, d))
              if n.startswith("stage-")]
  assert fs.listdir(root) == ["data", "hf", "imported", "run"]  # nothing built beside them
  # Credentials come from the environment alone: none reaches the bucket, nor
  # what capjax keeps on this machine (logs, data copies).
  for name in fs.files(root):
    assert SECRET.encode() not in fs.read_bytes(fs.join(root, name)), name
  for name in fs.files(env["CAPJAX_CACHE"]):
    with open(os.path.join(env["CAPJAX_CACHE"], name), "rb") as f:
      assert SECRET.encode() not in f.read(), name


def test_prepared_data_is_read_in_place_from_gs_and_copied_once_from_s3(
    store, client, prepared, tmp_path, monkeypatch, capsys):
  """gs:// shards are read where they are; s3:// ones are copied into the
  cache once, again only when changed, and never when the disk lacks room."""
  from pipeline import records
  scheme, fs = store[0], client
  folder = f"{scheme}://{buckets.BUCKET}/{tmp_path.name}/val"
  fs.copytree(prepared["val"], folder)
  local = records.PreparedSource(prepared["val"])
  source = records.PreparedSource(folder)
  assert [source[i] for i in range(len(source))] == [local[i] for i in range(len(local))]
  if scheme == "gs":
    assert all(p.startswith(folder + "/") for p in source.paths)
    return
  assert "copying 3 files" in capsys.readouterr().err
  records.PreparedSource(folder)
  assert "copying" not in capsys.readouterr().err
  shard = fs.join(folder, os.path.basename(local.paths[0]))
  fs.copy(records.PreparedSource(prepared["train"]).paths[0], shard)  # other bytes
  copied = records.PreparedSource(folder).paths[0]
  assert "copying 1 files" in capsys.readouterr().err
  assert open(copied, "rb").read() == fs.read_bytes(shard)

  other = f"{scheme}://{buckets.BUCKET}/{tmp_path.name}/val2"
  fs.copytree(prepared["val"], other)
  from pipeline import data_cache
  monkeypatch.setattr(data_cache, "SPARE", 1 << 60)  # a disk without room
  with pytest.raises(OSError, match=r"GiB to copy into .* GiB free there"):
    records.PreparedSource(other)
  cache = fs.local_twin(other, "data")
  assert not [n for n in os.listdir(cache) if records.is_shard(n)]


def _feed(fifo, proc, data: bytes, timeout: float) -> int:
  """`data` into the FIFO that the child `proc` reads, within `timeout`
  seconds (never blocked on a child that died or stopped reading); returns
  the FIFO's descriptor, still open: the child waits for more."""
  deadline = time.monotonic() + timeout
  while True:  # a FIFO opens for writing once the child opened it for reading
    try:
      fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
      break
    except OSError as e:
      if e.errno != errno.ENXIO or proc.poll() is not None or time.monotonic() > deadline:
        raise AssertionError(f"the child never opened {fifo} (status {proc.poll()})") from e
      time.sleep(0.05)
  try:
    view = memoryview(data)
    while view:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([], [fd], [], left)[1]:
        raise AssertionError(f"the child stopped reading {fifo}: {len(view)} bytes left")
      view = view[os.write(fd, view[:1 << 16]):]
  except BaseException:
    os.close(fd)
    raise
  return fd


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_an_upload_interrupted_midway_leaves_the_old_object(store, client, tmp_path, how):
  """What every output in a bucket relies on (shards, eval outputs, markers,
  exports): an upload stopped after 64 MiB went out (more than one part or
  chunk) leaves the object as it was, not a part of the new one. SIGKILL
  kills the process; SIGINT raises KeyboardInterrupt inside the copy, which
  leaves its `with` block, whose close() would have committed the upload."""
  scheme, env = store
  fifo = tmp_path / "source"
  os.mkfifo(fifo)
  url = f"{scheme}://{buckets.BUCKET}/{tmp_path.name}/big.bin"
  client.write_text(url, "the previous object")
  proc = subprocess.Popen([sys.executable, "-c", "import sys; from pipeline import fs; "
                           "fs.copy(sys.argv[1], sys.argv[2])", str(fifo), url],
                          cwd=REPO, env=env, start_new_session=True, stderr=subprocess.PIPE,
                          text=True)
  try:
    fd = _feed(fifo, proc, os.urandom(1 << 20) * 64, timeout=120)
    time.sleep(1)  # the parts read so far on their way; the copy waits for more
    os.killpg(proc.pid, getattr(signal, how))
    err = proc.communicate(timeout=60)[1]
    os.close(fd)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  if how == "SIGINT":
    assert "KeyboardInterrupt" in err, err
  else:
    assert proc.returncode == -signal.SIGKILL
  assert client.read_text(url) == "the previous object"
  if scheme == "s3":
    import boto3
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"])
    begun = [u for u in s3.list_multipart_uploads(Bucket=buckets.BUCKET).get("Uploads", [])
             if u["Key"].endswith(f"{tmp_path.name}/big.bin")]
    # Killed, its multipart upload stays begun, never completed (a bucket's
    # lifecycle rule clears those); interrupted, it is aborted.
    assert bool(begun) == (how == "SIGKILL"), begun


def _as_s3_run(fs, local_run, root):
  """A local run's checkpoints as an s3:// run directory's: each step's
  files, then its commit marker."""
  from trainer import faults
  for step in faults.committed_steps(str(local_run)):
    rel = os.path.join("checkpoints", str(step))
    names = fs.copytree(os.path.join(local_run, rel), fs.join(root, rel))
    fs.write_text(fs.join(root, rel, faults.S3_COMMIT), json.dumps({"files": names}) + "\n")


@pytest.mark.parametrize("store", ["s3"], indirect=True)
def test_loading_an_s3_run_downloads_its_parameters_once_and_no_optimiser_state(
    store, client, trained_run, tmp_path, monkeypatch):
  """What eval, predict and export-hf load (params.restore) moves from the
  bucket, counted at the one place downloads go through: one copy of the
  parameters, the config, the checksums and Orbax's metadata; none of the
  optimiser state or the data stream's position; nothing kept on disk."""
  from trainer import params
  fs = client
  root = f"s3://{buckets.BUCKET}/{tmp_path.name}/run"
  _as_s3_run(fs, str(trained_run), root)
  step = fs.join(root, "checkpoints", "10")
  sizes = {name: fs.version(fs.join(step, name))[0] for name in fs.files(step)}
  moved = []
  copy = fs.copy

  def counting(src, dst):
    if fs.is_bucket(src):
      moved.append((os.path.relpath(src, step), fs.version(src)[0]))
    copy(src, dst)

  monkeypatch.setattr(fs, "copy", counting)
  restored = params.restore(root)
  item = lambda name: name.split("/")[0]
  per_item = {}
  for name, size in moved:
    per_item[item(name)] = per_item.get(item(name), 0) + size
  total = lambda what: sum(s for n, s in sizes.items() if item(n) == what)
  assert per_item["params"] == total("params") > 0, per_item
  assert "opt_state" not in per_item and "data" not in per_item, per_item
  assert len(moved) == len(set(moved)), moved  # each file once
  print(f"downloaded {sum(per_item.values()):,} of the step's {sum(sizes.values()):,} bytes: "
        f"{per_item}")
  local = params.restore(str(trained_run))
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(local.params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  stages = fs.local_twin(fs.join(root, "checkpoints"))
  assert not [f for f in fs.files(stages) if "/params/" in f]  # in memory, not on disk


def test_an_export_replaced_midway_leaves_the_previous_one_loadable(
    store, client, local_export, tmp_path):
  """A re-export over a bucket export, SIGKILLed while its files go up
  (held at its last file, a FIFO no one writes): the old export is still
  whole there and loads in transformers; run again to the end, the new
  one replaces it, with nothing left beside it."""
  import shutil
  from safetensors.numpy import save_file
  from transformers import VisionEncoderDecoderModel
  scheme, env = store
  fs = client
  remote = f"{scheme}://{buckets.BUCKET}/{tmp_path.name}/hf"
  fs.copytree(str(local_export), remote)
  new = tmp_path / "new"
  shutil.copytree(local_export, new)
  old = _tensors(local_export)
  save_file({k: v * 2 for k, v in old.items()}, str(new / "model.safetensors"))
  os.mkfifo(new / "zz-held")  # uploaded last, its read waits for a writer
  proc = subprocess.Popen([sys.executable, "-c", "import sys; from pipeline import fs; "
                           "fs.publish(sys.argv[1], sys.argv[2], ('config.json',))", str(new),
                           remote], cwd=REPO, env=env, start_new_session=True)
  try:
    held = fs.join(remote, fs.NEXT, "model.safetensors")
    deadline = time.monotonic() + 120
    while not fs.exists(held) and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
    assert fs.exists(held), proc.poll()
    time.sleep(1)  # the files after it go up, up to the FIFO
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)

  def loaded(where):
    fs.rmtree(str(where))
    for name in fs.files(remote):
      if not name.startswith(fs.NEXT + "/"):
        fs.copy(fs.join(remote, name), str(where / name))
    VisionEncoderDecoderModel.from_pretrained(str(where))
    return _tensors(where)

  after_kill = loaded(tmp_path / "after-kill")
  assert all(np.array_equal(after_kill[k], old[k]) for k in old)
  (new / "zz-held").unlink()
  fs.publish(str(new), remote, ("config.json",))
  replaced = loaded(tmp_path / "replaced")
  assert all(np.array_equal(replaced[k], old[k] * 2) for k in old)
  assert fs.NEXT not in fs.listdir(remote)


def test_tars_and_parquet_in_a_bucket_are_read_in_place(store, client, synthetic_coco,
                                                        trained_run, tmp_path):
  """img2dataset tars in a bucket: `prepare` reads them (streamed, as local
  ones), and `caption` captions them into the bucket as it does the same
  tars on local disk, and again keeps what it wrote; a Parquet file in the
  bucket too."""
  import io
  import tarfile
  import pyarrow.parquet as pq
  from tests.test_caption import _samples
  scheme, env = store
  root = f"{scheme}://{buckets.BUCKET}/web-{os.getpid()}"
  samples = _samples(synthetic_coco)[:12]
  (tmp_path / "tars").mkdir()
  for t in range(2):
    with tarfile.open(tmp_path / "tars" / f"{t:05d}.tar", "w") as tar:
      for key, path, caption in samples[t * 6:(t + 1) * 6]:
        for ext, data in (("jpg", path.read_bytes()), ("txt", caption.encode())):
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    client.copy(str(tmp_path / "tars" / f"{t:05d}.tar"), f"{root}/tars/{t:05d}.tar")
  prepared = _capjax(env, "prepare", f"{root}/tars/{{00000..00001}}.tar", "--out",
                     str(tmp_path / "prepared"))
  assert json.loads(prepared.stdout.splitlines()[-1])["records"] == 12
  flags = ("--checkpoint", str(trained_run), "--num-beams", "2", "--batch-size", "4")
  _capjax(env, "caption", f"{root}/tars", "--out", f"{root}/captions", *flags)
  again = _capjax(env, "caption", f"{root}/tars", "--out", f"{root}/captions", *flags)
  assert "2 already written, kept" in again.stderr
  assert json.loads(client.read_text(f"{root}/captions/manifest.json"))["captioned"] == 12
  _capjax(env, "caption", str(tmp_path / "tars"), "--out", str(tmp_path / "local"), *flags)
  for t in range(2):
    with client.open_read(f"{root}/captions/{t:05d}.parquet") as f:
      remote = pq.read_table(f).to_pylist()
    local = pq.read_table(tmp_path / "local" / f"{t:05d}.parquet").to_pylist()
    assert remote == local and len(remote) == 6
  import pyarrow as pa
  pq.write_table(pa.table({"key": [k for k, _, _ in samples[:6]],
                           "jpg": [p.read_bytes() for _, p, _ in samples[:6]],
                           "txt": [c for _, _, c in samples[:6]]}), tmp_path / "part.parquet")
  client.copy(str(tmp_path / "part.parquet"), f"{root}/pq/part.parquet")
  _capjax(env, "caption", f"{root}/pq", "--out", str(tmp_path / "pq"), *flags)
  assert pq.read_table(tmp_path / "pq" / "part.parquet").to_pylist() == \
      pq.read_table(tmp_path / "local" / "00000.parquet").to_pylist()
