"""The training stream: deterministic, resumable to the batch, the same
global batches whatever the number of processes."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline import loader, order, sources, tokenizer, transforms
from tests.conftest import REPO, TINY_CONFIG, Output
from trainer import config, train


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_iterator_yields_the_same_batches(prepared, tmp_path, workers):
  cfg = config.load(TINY_CONFIG, [f"config.data.train={prepared['train']}",
                                  f"config.data.worker_count={workers}",
                                  "config.data.crop_scale=0.5"])
  src = sources.open_split(cfg.data, "train")
  tok_dir = str(tmp_path / "tok")
  tok = tokenizer.train_bpe(["a red circle", "two blue squares"] * 20, 280, tok_dir)
  d = cfg.model.decoder
  d.bos_token_id, d.eos_token_id, d.pad_token_id = tokenizer.special_ids(tok)
  it = iter(train.make_loader(cfg, src, tok_dir))
  for _ in range(3):
    next(it)
  state = it.get_state()
  straight = [next(it) for _ in range(4)]
  again = iter(train.make_loader(cfg, src, tok_dir))
  again.set_state(state)
  restored = [next(again) for _ in range(4)]
  for a, b in zip(straight, restored):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert straight[0]["image"].shape == (cfg.train.batch_size, 32, 32, 3)
  assert not np.array_equal(straight[0]["image"], straight[1]["image"])


@pytest.mark.parametrize("limit", [order.PERMUTATION_LIMIT, 0])  # numpy orders; Grain's shuffle
def test_global_batches_do_not_depend_on_process_count(monkeypatch, limit):
  monkeypatch.setattr(order, "PERMUTATION_LIMIT", limit)
  records = [f"r{i}" for i in range(10)]

  def global_batches(processes):
    shares = [loader.GlobalOrder(records, 3, 4, p, processes) for p in range(processes)]
    return [[x for s in shares for x in s[k]] for k in range(8)]

  one = global_batches(1)
  assert global_batches(2) == one and global_batches(4) == one
  stream = [x for batch in one for x in batch]
  assert [g for g, _ in stream] == list(range(32))
  epochs = [[r for _, r in stream[e * 10:(e + 1) * 10]] for e in range(3)]
  assert all(sorted(e) == sorted(records) for e in epochs)  # each record once an epoch
  assert epochs[0] != epochs[1] != epochs[2]  # in a new order each time
  assert loader.GlobalOrder(records, 3, 4)[5] == loader.GlobalOrder(records, 3, 4)[5]
  assert loader.GlobalOrder(records, 4, 4)[0] != loader.GlobalOrder(records, 3, 4)[0]
  with pytest.raises(ValueError, match="does not divide"):
    loader.GlobalOrder(records, 3, 4, 0, 3)


def test_state_restores_onto_other_process_and_worker_counts(prepared, tmp_path):
  """A run saved by one process with two workers resumes on two processes
  without workers, at the very next global batch."""
  tok_dir = str(tmp_path / "tok")
  tokenizer.train_bpe(["a red circle", "two blue squares"] * 20, 280, tok_dir)
  src = sources.open_source(prepared["train"])
  make_batch = transforms.TrainBatch(32, tok_dir, 12, 2, crop_scale=0.5, seed=1)
  one = loader.train_stream(src, make_batch, 8, 1, workers=2)
  for _ in range(5):
    next(one)
  state = one.get_state()
  assert state["next_batch"] == 5
  straight = [next(one) for _ in range(3)]
  one.close()
  halves = [loader.train_stream(src, make_batch, 8, 1, p, 2) for p in range(2)]
  assert halves[0].get_state()["stream"] == state["stream"]
  for h in halves:
    h.set_state(state)
  for want in straight:
    got = [next(h) for h in halves]
    for key in want:
      np.testing.assert_array_equal(want[key], np.concatenate([g[key] for g in got]))


def test_examples_are_the_same_however_the_work_is_split(prepared, tmp_path):
  """Random crops and caption choices follow the example, not the process."""
  tok_dir = str(tmp_path / "tok")
  tokenizer.train_bpe(["a red circle", "two blue squares"] * 20, 280, tok_dir)
  src = sources.open_source(prepared["train"])
  make_batch = transforms.TrainBatch(32, tok_dir, 12, 2, crop_scale=0.5, seed=5)

  def batches(process_index, process_count):
    it = iter(loader.train_stream(src, make_batch, 8, 5, process_index, process_count))
    return [next(it) for _ in range(len(src) // 8 + 2)]  # into the second epoch

  whole = batches(0, 1)
  halves = zip(batches(0, 2), batches(1, 2))
  for k, (a, b) in enumerate(halves):
    for key in whole[k]:
      np.testing.assert_array_equal(whole[k][key], np.concatenate([a[key], b[key]]), err_msg=key)
  assert whole[0]["input_ids"].shape == (8, 2, 12) and whole[0]["skipped"].shape == (8,)


def _ring_files() -> set[str]:
  return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_worker_images_come_through_the_ring_unchanged(prepared, tmp_path):
  """One worker, three slots, twelve batches: every slot reused several
  times, and every batch as the in-process stream builds it."""
  tok_dir = str(tmp_path / "tok")
  tokenizer.train_bpe(["a red circle", "two blue squares"] * 20, 280, tok_dir)
  src = sources.open_source(prepared["train"])
  make_batch = transforms.TrainBatch(32, tok_dir, 12, 2, crop_scale=0.5, seed=2)
  before = _ring_files()
  worker = loader.train_stream(src, make_batch, 8, 3, workers=1, prefetch=1)
  threads = loader.train_stream(src, make_batch, 8, 3)
  want = [next(threads) for _ in range(12)]
  got = [next(worker) for _ in range(12)]
  assert worker._ring is not None and worker._ring.slots == 3
  ring_file = os.path.basename(worker._ring.path)
  assert ring_file in _ring_files() - before
  for a, b in zip(want, got):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  worker.close()
  assert ring_file not in _ring_files()  # removed with the stream


def test_closing_the_stream_ends_its_worker_without_a_kill(prepared, tmp_path):
  """Grain starts the workers from a thread of its own that ends at close: a
  parent-death signal bound to it killed a worker mid-write, and close then
  waited forever on the half-written batch. The worker must end on its own."""
  import multiprocessing
  import threading
  tok_dir = str(tmp_path / "tok")
  tokenizer.train_bpe(["a red circle", "two blue squares"] * 20, 280, tok_dir)
  src = sources.open_source(prepared["train"])
  make_batch = transforms.TrainBatch(32, tok_dir, 12, 2, seed=2)
  before = set(multiprocessing.active_children())
  stream = loader.train_stream(src, make_batch, 8, 3, workers=1, prefetch=4)
  for _ in range(3):
    next(stream)
  workers = set(multiprocessing.active_children()) - before
  assert len(workers) == 1
  time.sleep(0.5)  # the worker fills its buffer, and waits
  closing = threading.Thread(target=stream.close, daemon=True)
  closing.start()
  closing.join(60)
  assert not closing.is_alive(), "close() did not return within 60 s"
  worker = workers.pop()
  worker.join(30)
  assert worker.exitcode == 0


def test_ring_removed_when_the_process_is_killed(tmp_path):
  """The slots live in /dev/shm: a SIGKILLed run must not leave them."""
  code = ("from pipeline import loader; import sys, time\n"
          "r = loader.ImageRing(4, (2, 8, 8, 3), 0)\n"
          "print(r.path, flush=True); time.sleep(60)\n")
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    path = Output(proc).wait_for("/", 60).strip()
    assert os.path.exists(path)
  finally:
    proc.kill()
  proc.wait(30)
  deadline = time.time() + 20
  while os.path.exists(path) and time.time() < deadline:
    time.sleep(0.1)
  assert not os.path.exists(path)


@pytest.mark.serial  # reads all of /dev/shm, which tests running beside it would change
def test_no_room_for_the_ring_falls_back_to_grain(prepared, tmp_path, monkeypatch, caplog):
  tok_dir = str(tmp_path / "tok")
  tokenizer.train_bpe(["a red circle", "two blue squares"] * 20, 280, tok_dir)
  src = sources.open_source(prepared["train"])
  make_batch = transforms.TrainBatch(32, tok_dir, 12, 1, seed=2)
  before = _ring_files()

  def full(fd, offset, length):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "posix_fallocate", full)
  stream = loader.train_stream(src, make_batch, 8, 3, workers=1)
  got = [next(stream) for _ in range(2)]
  stream.close()
  assert "image ring not made" in caplog.text and "No space left" in caplog.text
  assert _ring_files() == before  # nothing left behind
  threads = loader.train_stream(src, make_batch, 8, 3)
  for a in got:
    b = next(threads)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_train_epochs_sets_the_steps():
  cfg = config.load(TINY_CONFIG, ["config.train.epochs=2.5", "config.train.batch_size=8"])
  train.resolve_steps(cfg, 96)
  assert cfg.train.steps == 30
  cfg = config.load(TINY_CONFIG, ["config.train.steps=0"])
  with pytest.raises(ValueError, match="train.steps=0"):
    train.resolve_steps(cfg, 96)
