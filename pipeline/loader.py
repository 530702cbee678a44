"""The training stream: one global order of examples, whatever the number of
processes, cut into each process's share of every global batch.

The global stream is the records in a fresh random order each epoch, epoch
after epoch without end; global batch b is its elements [b*B, (b+1)*B).
Process p of P builds rows [p*B/P, (p+1)*B/P) of each global batch, and an
element's randomness (which captions, which crop) comes from the seed and its
place in the global stream. So the global batches, and the run's losses, do
not depend on how many processes (or devices) share the work.

Workers (`mp_prefetch`) build whole batches; the main process only receives
them, the images through a ring of shared-memory slots (ImageRing). The
stream's state is the next global batch's number, checkpointed with the run.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import weakref
from multiprocessing import shared_memory
from typing import Any

import grain
import numpy as np

from pipeline import mixture, shm
from pipeline.order import EpochOrder

class GlobalOrder(grain.MapDataset):
  """Process `process_index`'s rows of global batch k: `[(g, record), ...]`,
  g each record's place in the global stream. Endless: epochs follow one
  another, each in its own order; a mixture.Mixture's places follow its own
  order (its sources' shares, each source in epochs of its own)."""

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
    self.global_batch = global_batch
    self.share = global_batch // process_count  # this process's rows of each batch
    self._offset = process_index * self.share
    self._places = (source.order(seed) if isinstance(source, mixture.Mixture)
                    else EpochOrder(len(source), seed))

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"GlobalOrder({self._source!r}, seed={self._seed})"

  def record_index(self, g: int) -> int:
    return self._places[g]

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    first = k * self.global_batch + self._offset
    places = range(first, first + self.share)
    indices = [self.record_index(g) for g in places]
    # Sources on remote storage (TFDS's) read a batch in parallel; local
    # files are faster one by one.
    read_many = getattr(self._source, "__getitems__", None)
    records = read_many(indices) if read_many else [self._source[i] for i in indices]
    return list(zip(places, records))


class ImageRing:
  """Shared-memory slots that carry batch images from the workers to the
  main process, made once and reused.

  Grain hands each array over in a fresh shared-memory segment: the worker
  copies the batch into it and the kernel maps in new pages every time
  (measured here: 4 ms for a batch of 32 images at 224 px, a ninth of the
  worker's time). Here a worker decodes batch k straight into slot
  (k - first) % slots, and the main process copies the images out and frees
  the slot: `header[slot]` is the batch that slot takes next. A worker whose
  slot is still held waits; there are more slots than Grain keeps batches in
  flight, so it seldom does.
  """

  HEADER = 4096  # bytes before the slots: one int64 per slot, page-aligned

  def __init__(self, slots: int, shape: tuple[int, ...], first: int):
    if sys.platform != "linux":
      raise OSError("shared-memory files are read by path on Linux only")
    self.slots, self.shape, self.first = slots, tuple(shape), first
    self.slot_bytes = int(np.prod(shape))
    if slots * 8 > self.HEADER:
      raise ValueError(f"{slots} slots: at most {self.HEADER // 8}")
    size = self.HEADER + slots * self.slot_bytes
    # Made through Python's SharedMemory so that its resource tracker removes
    # it even if this process is killed; mapped by path, here and in the
    # workers, which must not register it again.
    self._shm = shared_memory.SharedMemory(shm.new_name("ring"), create=True, size=size)
    self._shm.close()
    self.path = os.path.join("/dev/shm", self._shm.name.lstrip("/"))
    try:
      # Reserved now: a shared-memory folder too small fails here, not as a
      # SIGBUS when a worker first writes to a slot.
      fd = os.open(self.path, os.O_RDWR)
      try:
        os.posix_fallocate(fd, 0, size)
      finally:
        os.close(fd)
    except OSError:
      self._shm.unlink()
      raise
    self._map = None
    self.header[:] = first + np.arange(slots)

  def __getstate__(self):
    return {**self.__dict__, "_map": None, "_shm": None}

  def _mapped(self) -> np.ndarray:
    """The file's bytes, mapped on first use in each process."""
    if self._map is None:
      self._map = np.memmap(self.path, np.uint8, "r+")
    return self._map

  @property
  def header(self) -> np.ndarray:
    return self._mapped()[:self.slots * 8].view(np.int64)

  def _slot(self, k: int) -> tuple[int, np.ndarray]:
    s = (k - self.first) % self.slots
    start = self.HEADER + s * self.slot_bytes
    return s, self._mapped()[start:start + self.slot_bytes].reshape(self.shape)

  def acquire(self, k: int) -> np.ndarray:
    """(worker) Batch k's slot, once the main process has freed it."""
    header = self.header
    s, view = self._slot(k)
    waited = 0.0
    while header[s] != k:
      if header[s] > k:
        raise RuntimeError(f"image slot {s} already passed batch {k}")
      time.sleep(0.0005)
      waited += 0.0005
      if waited > 1.0:  # the main process closed the stream, or is gone
        if not os.path.exists(self.path):
          raise RuntimeError("the batch stream was closed")
        waited = 0.0
    return view

  def take(self, k: int) -> np.ndarray:
    """(main process) A copy of batch k's images; the slot is freed."""
    header = self.header
    s, view = self._slot(k)
    images = np.array(view)
    header[s] = k + self.slots
    return images

  def close(self) -> None:
    """(main process) Removes the slots; workers still mapping them keep
    theirs until they exit."""
    self._map = None
    shm, self._shm = self._shm, None
    if shm is not None:
      shm.unlink()


class _IntoRing(grain.transforms.Map):
  """make_batch, its images decoded into the ring; the batch's number in
  their place."""

  def __init__(self, make_batch: Any, ring: ImageRing, global_batch: int):
    self._make_batch, self._ring, self._global = make_batch, ring, global_batch

  def map(self, elements):
    k = elements[0][0] // self._global
    batch = self._make_batch.map(elements, images=self._ring.acquire(k))
    batch["image"] = np.int64(k)
    return batch


def _worker_init(parent: int, index: int, count: int) -> None:
  # Grain starts its workers from a thread of its own, which ends when the
  # stream closes: a parent-death signal bound to it would SIGKILL a worker
  # while it writes a batch into the queue that close() then drains, and the
  # drain would wait forever for the rest. So only the poll.
  shm.die_with_parent(parent, started_on_main_thread=False)


class BatchStream:
  """This process's batches, from global batch `next_batch` on. Its state is
  that one number (the same in every process), so a run restores onto any
  number of processes or workers and continues with the very next batch."""

  def __init__(self, order: GlobalOrder, make_batch: Any, workers: int = 0,
               prefetch: int = 4, description: str = ""):
    self._order = order
    self._make_batch = make_batch
    self.description = description
    self._workers = workers
    self._prefetch = max(prefetch, 1)
    self._next = 0
    self._it = None
    self._ring = None

  def _start(self):
    ds = self._order[self._next:]
    if not self._workers:  # decoding releases the GIL: threads overlap it
      return iter(ds.map(self._make_batch).to_iter_dataset(grain.ReadOptions(
          num_threads=self._prefetch, prefetch_buffer_size=self._prefetch)))
    size = self._make_batch.image_size
    make_batch = self._make_batch
    try:
      self._ring = ImageRing(self._workers * (self._prefetch + 2),
                             (self._order.share, size, size, 3), self._next)
      weakref.finalize(self, self._ring.close)
      make_batch = _IntoRing(make_batch, self._ring, self._order.global_batch)
    except OSError as e:  # no room in shared memory: Grain's own hand-over
      logging.warning("image ring not made (%s); images go through Grain's shared memory", e)
    # In each worker one thread reads the next batch's records (storage
    # latency hidden behind decoding) and the worker's main thread builds
    # batches, one at a time: more threads would only contend for its core.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    it = it.map(make_batch)
    # Shared memory only for large arrays: a segment costs more than
    # pickling the small ones.
    it = grain.experimental.WithOptionsIterDataset(
        it, grain.experimental.DatasetOptions(min_shm_size=1 << 16))
    return iter(it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=self._workers, per_worker_buffer_size=self._prefetch),
        worker_init_fn=functools.partial(_worker_init, os.getpid())))

  def __iter__(self) -> "BatchStream":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self._start()
    batch = next(self._it)
    if self._ring is not None:
      batch["image"] = self._ring.take(int(batch["image"]))
    self._next += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"next_batch": self._next, "stream": self.description}

  def set_state(self, state: dict[str, Any]) -> None:
    self.close()
    self._next = int(state["next_batch"])

  def close(self) -> None:
    # The ring first: a worker waiting for a slot sees it gone and stops,
    # rather than holding up Grain's join until its 25-second kill.
    if self._ring is not None:
      self._ring.close()
    self._ring = None
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()  # stops the workers
    self._it = None


def train_stream(source: Any, make_batch: Any, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1, workers: int = 0,
                 prefetch: int = 4) -> BatchStream:
  """This process's batches, `make_batch.map([(g, record), ...])` (a
  transforms.TrainBatch), endless.

  workers > 0: that many processes each build whole batches, `prefetch` of
  them buffered per worker. workers = 0: batches built in the main process by
  `prefetch` threads.
  """
  order = GlobalOrder(source, seed, global_batch, process_index, process_count)
  return BatchStream(order, make_batch, workers, prefetch,
                     f"{source!r}, seed {seed}, global batch {global_batch}")
