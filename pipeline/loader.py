"""The training stream: one global order of examples, whatever the number of
processes, cut into each process's share of every global batch.

The global stream is the records in a fresh random order each epoch, epoch
after epoch without end; global batch b is its elements [b*B, (b+1)*B).
Process p of P builds rows [p*B/P, (p+1)*B/P) of each global batch, and an
element's randomness (which captions, which crop) comes from the seed and its
place in the global stream. So the global batches, and the run's losses, do
not depend on how many processes (or devices) share the work.

Workers (`mp_prefetch`) build whole batches; the main process only receives
them. The stream's state is the next global batch's number, checkpointed with
the run.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import grain
import numpy as np

# Up to this many records an epoch's order is a numpy permutation held in
# memory (4 bytes a record), a few microseconds an element; beyond it Grain's
# memory-free index shuffle (about 60 microseconds an element, measured here).
PERMUTATION_LIMIT = 1 << 25


class GlobalOrder(grain.MapDataset):
  """Process `process_index`'s rows of global batch k: `[(g, record), ...]`,
  g each record's place in the global stream. Endless: epochs follow one
  another, each in its own order."""

  def __init__(self, source: Any, seed: int, global_batch: int, process_index: int = 0,
               process_count: int = 1):
    super().__init__()
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} does not divide over {process_count} "
                       "processes")
    if not len(source):
      raise ValueError(f"{source!r}: no records to train on")
    self._source = source
    self._seed = seed
    self._n = len(source)
    self._global = global_batch
    self._share = global_batch // process_count
    self._offset = process_index * self._share
    self._orders: dict[int, np.ndarray] = {}
    self._big = grain.MapDataset.range(self._n).shuffle(seed=seed % 2**32)

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"GlobalOrder({self._source!r}, seed={self._seed})"

  def record_index(self, g: int) -> int:
    if self._n > PERMUTATION_LIMIT:
      return self._big[g]  # epoch g // n's order, in [0, n)
    epoch, j = divmod(g, self._n)
    order = self._orders.get(epoch)
    if order is None:
      # Batches straddle epochs: keep the two latest orders.
      for old in sorted(self._orders)[:-1]:
        del self._orders[old]
      order = np.random.default_rng((self._seed, epoch)).permutation(self._n).astype(np.int64)
      self._orders[epoch] = order
    return int(order[j])

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    first = k * self._global + self._offset
    places = range(first, first + self._share)
    indices = [self.record_index(g) for g in places]
    # Sources on remote storage (TFDS's) read a batch in parallel; local
    # files are faster one by one.
    read_many = getattr(self._source, "__getitems__", None)
    records = read_many(indices) if read_many else [self._source[i] for i in indices]
    return list(zip(places, records))


class BatchStream:
  """This process's batches, from global batch `next_batch` on. Its state is
  that one number (the same in every process), so a run restores onto any
  number of processes or workers and continues with the very next batch."""

  def __init__(self, batches: grain.MapDataset, workers: int = 0, prefetch: int = 4,
               description: str = ""):
    self._batches = batches
    self.description = description
    self._workers = workers
    self._prefetch = max(prefetch, 1)
    self._next = 0
    self._it = None

  def _start(self):
    ds = self._batches[self._next:]
    if not self._workers:  # decoding releases the GIL: threads overlap it
      return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=self._prefetch,
                                                       prefetch_buffer_size=self._prefetch)))
    # One batch at a time in each worker: threads there would only contend
    # for the worker's core.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    # Shared memory only for the images: a segment costs more than pickling
    # the small arrays.
    it = grain.experimental.WithOptionsIterDataset(
        it, grain.experimental.DatasetOptions(min_shm_size=1 << 16))
    return iter(it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=self._workers, per_worker_buffer_size=self._prefetch)))

  def __iter__(self) -> "BatchStream":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self._start()
    batch = next(self._it)
    self._next += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"next_batch": self._next, "stream": self.description}

  def set_state(self, state: dict[str, Any]) -> None:
    self.close()
    self._next = int(state["next_batch"])

  def close(self) -> None:
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()  # stops the workers
    self._it = None


def train_stream(source: Any, make_batch: Callable[[list[tuple[int, Any]]], Any],
                 global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                 workers: int = 0, prefetch: int = 4) -> BatchStream:
  """This process's batches, `make_batch([(g, record), ...])` (e.g. a
  transforms.TrainBatch), endless.

  workers > 0: that many processes each build whole batches, `prefetch` of
  them buffered per worker. workers = 0: batches built in the main process by
  `prefetch` threads.
  """
  ds = GlobalOrder(source, seed, global_batch, process_index, process_count).map(make_batch)
  return BatchStream(ds, workers, prefetch,
                     f"{source!r}, seed {seed}, global batch {global_batch}")
