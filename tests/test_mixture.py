"""Training mixtures: weights kept over every stretch of the stream, the same
global batches whatever the number of processes, exact resumes, per-source
sample counts in the metrics."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline import loader, mixture, order, records, tokenizer, transforms
from tests.conftest import TINY_CONFIG, train_tiny
from trainer import checkpoint, config

SIZES = (1237, 389, 4001)  # multiples of nothing in sight


def _lists(sizes=SIZES):
  return [[f"{'abc'[s]}{i}" for i in range(n)] for s, n in enumerate(sizes)]


def test_fractions_stay_within_a_percent_of_the_weights():
  mix = mixture.Mixture(_lists(), [5, 3, 2], ["a", "b", "c"])  # normalised: 0.5, 0.3, 0.2
  assert mix.weights == [0.5, 0.3, 0.2]
  order = mix.order(7)
  n = 60_000
  sources = np.array([order.locate(g)[0] for g in range(n)])
  for start in range(0, n - 10_000 + 1, 250):
    got = np.bincount(sources[start:start + 10_000], minlength=3) / 10_000
    np.testing.assert_allclose(got, [0.5, 0.3, 0.2], atol=0.01, err_msg=f"from {start}")
  # At every block's end, within a sample or two of the shares, however far.
  for g in (n, 10**9, 10**15 + order.block):
    assert np.abs(order.counts(g) - np.array([0.5, 0.3, 0.2]) * g).max() <= 2


def test_each_source_runs_through_its_own_epochs():
  mix = mixture.Mixture(_lists(), [0.5, 0.3, 0.2], ["a", "b", "c"])
  order = mix.order(3)
  draws: dict[int, list[tuple[int, int]]] = {0: [], 1: [], 2: []}
  for g in range(4000):
    s, k = order.locate(g)
    draws[s].append((k, order[g]))
  b = draws[1]
  assert [k for k, _ in b] == list(range(len(b)))  # the draws in order, none missed
  first = [mix[i] for _, i in b[:389]]
  second = [mix[i] for _, i in b[389:778]]
  assert sorted(first) == sorted(second) == sorted(mix.sources[1])  # each record once an epoch
  assert first != second  # a fresh order each epoch


def test_counts_equal_counting_the_places_one_by_one():
  order = mixture.Mixture(_lists(), [0.5, 0.3, 0.2], ["a", "b", "c"]).order(11)
  running = np.zeros(3, np.int64)
  for g in range(3500):
    np.testing.assert_array_equal(order.counts(g), running, err_msg=f"place {g}")
    running[order.locate(g)[0]] += 1
  fresh = mixture.Mixture(_lists(), [0.5, 0.3, 0.2], ["a", "b", "c"]).order(11)
  np.testing.assert_array_equal(fresh.counts(3500), running)  # random access, no history


@pytest.mark.parametrize("limit", [order.PERMUTATION_LIMIT, 0])  # numpy orders; Grain's shuffle
def test_global_batches_do_not_depend_on_process_count(monkeypatch, limit):
  monkeypatch.setattr(order, "PERMUTATION_LIMIT", limit)
  mix = mixture.Mixture(_lists((13, 7, 29)), [0.5, 0.3, 0.2], ["a", "b", "c"])

  def global_batches(processes, batches=range(40)):
    shares = [loader.GlobalOrder(mix, 5, 8, p, processes) for p in range(processes)]
    return [[x for s in shares for x in s[k]] for k in batches]

  one = global_batches(1)
  assert global_batches(2) == one and global_batches(4) == one
  assert [g for batch in one for g, _ in batch] == list(range(320))
  assert global_batches(2, [39, 3]) == [one[39], one[3]]  # random access
  assert loader.GlobalOrder(mix, 6, 8)[0] != one[0]


def test_single_source_orders_are_unchanged():
  """A plain source's stream is the one it always was: numpy's permutation
  of each epoch, seeded by (seed, epoch)."""
  recs = list(range(37))
  order = loader.GlobalOrder(recs, 4, 8)
  got = [r for k in range(10) for _, r in order[k]]
  want = np.concatenate([np.random.default_rng((4, e)).permutation(37) for e in range(3)])
  assert got == want[:80].tolist()


def test_real_stream_resumes_exactly_on_any_process_and_worker_count(prepared, tmp_path):
  tok_dir = str(tmp_path / "tok")
  tokenizer.train_bpe(["a red circle", "two blue squares"] * 20, 280, tok_dir)
  make_batch = transforms.TrainBatch(32, tok_dir, 12, 2, crop_scale=0.5, seed=1)

  def stream(process_index=0, process_count=1, workers=0):
    mix = mixture.Mixture([records.PreparedSource(prepared["train"]),
                           records.PreparedSource(prepared["val"])], [0.7, 0.3],
                          ["train", "val"])
    return loader.train_stream(mix, make_batch, 8, 1, process_index, process_count, workers)

  straight = stream()
  for _ in range(4):
    next(straight)
  state = straight.get_state()
  assert state["next_batch"] == 4 and state["stream"].startswith("Mixture([('train', ")
  want = [next(straight) for _ in range(4)]
  restored = stream(workers=2)
  restored.set_state(state)
  halves = [stream(p, 2) for p in range(2)]
  for h in halves:
    h.set_state(state)
  for batch in want:
    got = next(restored)
    split = [next(h) for h in halves]
    for key in batch:
      np.testing.assert_array_equal(batch[key], got[key], err_msg=key)
      np.testing.assert_array_equal(batch[key], np.concatenate([s[key] for s in split]),
                                    err_msg=key)
  restored.close()


def test_config_forms_and_names():
  text = "[('data/x/train', 0.7), ('data/y/train', 0.3), ('web', 'tfds:cc', 1)]"
  entries = mixture.parse(text)
  assert entries == [(None, "data/x/train", 0.7), (None, "data/y/train", 0.3),
                     ("web", "tfds:cc", 1)]
  assert mixture.names(entries) == ["train", "train_2", "web"]
  assert mixture.names([(None, "tfds:coco_captions", 1), (None, "hf:/d/cc3m/", 1)]) == \
      ["coco_captions", "cc3m"]
  # A config file's list, and the saved config's JSON (lists), mean the same.
  assert mixture.parse(json.loads(json.dumps(entries))) == entries
  assert not mixture.is_mixture("data/x") and mixture.is_mixture(text)
  assert mixture.absolute("tfds:cc") == "tfds:cc"
  absolute = mixture.absolute(text)
  assert isinstance(absolute, str) and mixture.parse(absolute) == [
      (None, os.path.abspath("data/x/train"), 0.7), (None, os.path.abspath("data/y/train"), 0.3),
      ("web", "tfds:cc", 1)]
  assert mixture.absolute([("a", 1.0)]) == [(os.path.abspath("a"), 1.0)]
  cfg = config.load(TINY_CONFIG, [f"config.data.train={text}"])
  assert cfg.data.train == text  # parsed when the run opens it


@pytest.mark.parametrize("value, message", [
    ("[('a', 0.7), ('b', 0)]", r"entry 2 \('b', 0\): the weight must be a positive number"),
    ("[('a', -1)]", r"entry 1 \('a', -1\): the weight must be"),
    ("[('a', 'heavy')]", r"entry 1 \('a', 'heavy'\): the weight must be"),
    ("[('a', 1.0), 'b']", r"entry 2 'b': expected \(source, weight\)"),
    ("[('a', 1.0), ('n', 'b', 2, 3)]", r"entry 2 .*: expected \(source, weight\)"),
    ("[(3, 1.0)]", r"entry 1 \(3, 1.0\): the source must be a non-empty string"),
    ("[('', 'a', 1.0)]", r"entry 1 .*: the name must be"),
    ("[('n', 'a', 1), ('n', 'b', 1)]", r"names given twice"),
    ("[]", r"non-empty list"),
    ("[('a', 0.7", r"not a Python list"),
])
def test_bad_entries_give_a_one_line_error(value, message):
  with pytest.raises(ValueError, match=message) as e:
    mixture.parse(value)
  assert str(e.value).startswith("data.train: ") and "\n" not in str(e.value)


def test_training_logs_samples_per_source_and_resumes(prepared, tmp_path):
  train = f"--config.data.train=[('{prepared['train']}', 0.7), ('{prepared['val']}', 0.3)]"
  first = train_tiny(tmp_path, prepared, train, "--config.train.steps=4")
  assert "mixture: train 96 records x 0.7, val 20 records x 0.3" in first.stdout
  second = train_tiny(tmp_path, prepared, train, "--config.train.steps=6")
  assert "resuming from the checkpoint at step 4" in second.stdout
  assert "note: the checkpoint's data stream" not in second.stdout  # the same mixture
  saved = checkpoint.load_config(str(tmp_path), 6)
  mix = mixture.open_train(saved.data)  # the saved config reads from anywhere
  assert mix.names == ["train", "val"] and mix.weights == [0.7, 0.3]
  order = mix.order(saved.seed)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in rows] == list(range(1, 7))  # nothing logged twice
  for r in rows:
    want = order.counts(r["step"] * saved.train.batch_size)
    assert [r["data/samples/train"], r["data/samples/val"]] == want.tolist(), r["step"]
  # The eval baseline's most frequent caption is counted over every record.
  from trainer import evaluate
  both = [c for split in ("train", "val")
          for _, caps in mixture.ids_and_captions(records.PreparedSource(prepared[split]))
          for c in caps]
  assert both.count(evaluate.most_frequent_caption(mix)) == max(map(both.count, set(both)))
