"""`capjax prepare`: any caption source into ArrayRecord shards, streaming.

`sources.open_source` turns a source name into a source: a prepared folder,
`tfds:NAME`, `hf:NAME`, a COCO caption JSON, the Karpathy split JSON, a
CSV/JSON/JSONL table, WebDataset tar shards or Parquet files. `prepare` cuts
it into units (an input file, or a range of records), each streamed
into one output shard by a worker process (by prepare's own process when it
has one worker), or by Apache Beam's workers (`runner="beam"`): memory stays
bounded whatever the data set's size, and a prepare that was stopped, run
again, writes only the shards it had not finished (shards.py). Every image
is decoded once, so damaged files are found here rather than in the middle
of a run; those are skipped, counted and reported by reason. Optionally
images are shrunk (shorter side N, re-encoded as JPEG) so that long runs stop
paying full-size decoding every epoch.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import time
import types
from typing import Any

from pipeline import fs, processes, shards, shm, sources
from pipeline.sources import SourceError  # noqa: F401  (part of this module's surface)


def duration(seconds: float) -> str:
  seconds = int(seconds)
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
  """Console lines while prepare works: records, images/s, skipped, ETA.
  Each unit reports (work done, kept, skipped); the ETA comes from the work
  left in this run, in each unit's own measure."""

  def __init__(self, units: list, todo: list[int], reused: int, every: float):
    self.sizes = {i: max(units[i].size, 1) for i in todo}
    self.state = {i: (0, 0, 0) for i in todo}
    self.shards, self.reused, self.written = len(units), reused, 0
    self.every = every
    self.t0 = self.last = time.monotonic()
    self.working = None  # when the first report came: rates leave out the start-up

  def update(self, index: int, work: int, kept: int, skipped: int) -> None:
    self.working = self.working or time.monotonic()
    self.state[index] = (min(work, self.sizes[index]), kept, skipped)

  def line(self) -> str:
    elapsed = time.monotonic() - (self.working or self.t0)
    kept = sum(k for _, k, _ in self.state.values())
    skipped = sum(s for _, _, s in self.state.values())
    done = sum(w / self.sizes[i] for i, (w, _, _) in self.state.items())
    left = len(self.state) - done
    eta = duration(elapsed * left / done) if done > 0 else "?"
    return (f"prepare: {kept:,} records, {skipped:,} skipped, "
            f"{(kept + skipped) / max(elapsed, 1e-9):,.0f} images/s; shards "
            f"{self.reused + self.written} of {self.shards} written; ETA {eta}")

  def tick(self, force: bool = False) -> None:
    if force or time.monotonic() - self.last >= self.every:
      print(self.line(), file=sys.stderr, flush=True)
      self.last = time.monotonic()


_worker: dict[str, Any] = {}


def _init(out_dir: str, count: int, options: shards.Options, reports, started) -> None:
  shm.die_with_parent(os.getppid(), True)  # the forkserver, which ends with prepare
  _worker.update(out_dir=out_dir, count=count, options=options, reports=reports)
  # Watched, as a worker killed midway loses its shard; told at once (a
  # Queue's put is sent later, by a thread that the kill may forestall).
  started.put(os.getpid())


class WorkerDied(ChildProcessError):
  """A pool worker ended abruptly (the out-of-memory killer, say)."""


def _write(index: int, unit: Any) -> tuple[int, dict]:
  """Each task carries its own unit: a worker holds the rows it writes, not every unit's."""
  reports = _worker["reports"]
  counts = shards.write_shard(_worker["out_dir"], index, _worker["count"], unit,
                              _worker["options"], lambda *r: reports.put((index, *r)))
  return index, counts


def _preload() -> list[str]:
  """The modules a worker needs: this one, and those the main module took
  names from. A worker runs the main module again (as a spawned process
  does), and Python 3.11's forkserver drops a "__main__" preload, so what
  the main module imports is imported once, in the server, instead of once
  per worker (a second each for a script importing Grain or JAX)."""
  names = {__name__}
  main = sys.modules.get("__main__")
  for value in vars(main).values() if main else ():
    name = value.__name__ if isinstance(value, types.ModuleType) else getattr(
        value, "__module__", None)
    if (isinstance(name, str) and name in sys.modules and not name.startswith("_")
        and name not in sys.builtin_module_names):
      names.add(name)
  return sorted(names)


def _run_here(out_dir: str, units: list, todo: list[int], options: shards.Options,
              progress: Progress) -> None:
  """One worker: the units are written in this process, one after another; a
  pool of one would add its start-up and the hand-over of every report."""
  for i in todo:
    def report(work: int, kept: int, skipped: int, index: int = i) -> None:
      progress.update(index, work, kept, skipped)
      progress.tick()

    shards.write_shard(out_dir, i, len(units), units[i], options, report)
    progress.written += 1
    progress.tick()


def _run_local(out_dir: str, units: list, todo: list[int], options: shards.Options,
               workers: int, progress: Progress) -> None:
  # The pool's semaphores live in /dev/shm: named for this output, so that a
  # prepare killed whole (its resource tracker with it) has its rerun remove them.
  shm.claim(out_dir)
  ctx = multiprocessing.get_context("forkserver")
  ctx.set_forkserver_preload(_preload())  # workers start from a process that has imported them
  reports = ctx.Queue()  # (shard, work, kept, skipped) from the workers; None: one ended
  started = ctx.SimpleQueue()  # each worker's pid
  failed: list[BaseException] = []
  finished: list[int] = []

  def ended(outcome: list, value) -> None:
    outcome.append(value)
    reports.put(None)

  try:
    with ctx.Pool(workers, initializer=_init,
                  initargs=(out_dir, len(units), options, reports, started)) as pool:
      for i in todo:
        pool.apply_async(_write, (i, units[i]), callback=lambda r: ended(finished, r[0]),
                         error_callback=lambda e: ended(failed, e))
      pids: set[int] = set()
      while len(finished) < len(todo) and not failed:
        try:
          report = reports.get(timeout=min(max(progress.every, 0.05), 1.0))
          if report is not None:
            progress.update(*report)
        except queue.Empty:
          pass
        progress.written = len(finished)
        progress.tick()
        # The pool starts a new worker for a dead one, but the dead one's
        # shard is never finished: without this it would wait forever.
        while not started.empty():
          pids.add(started.get())
        dead = [p for p in pids if not processes.alive(p)]
        if dead and len(finished) < len(todo):
          kept = len(units) - len(todo) + len(finished)
          failed.append(WorkerDied(
              f"a worker process (pid {dead[0]}) died midway, most likely killed by the "
              f"out-of-memory killer; the {kept} shards written are kept: run the same "
              "command to write the rest (with fewer --workers if memory is short)"))
      if failed:
        pool.terminate()
        raise failed[0]
    while True:  # the last reports, so that the final line counts everything
      try:
        report = reports.get_nowait()
      except queue.Empty:
        break
      if report is not None:
        progress.update(*report)
  finally:  # its feeder thread ends here, not in an exit handler (one was seen waiting there)
    reports.close()
    reports.join_thread()


def prepare(source, out_dir: str, num_shards: int | None = None, workers: int | None = None,
            resize_shorter: int = 0, jpeg_quality: int = 90, runner: str = "local",
            beam_options: str = "", progress_every: float = 10.0) -> dict:
  """Writes `source`'s records as shards under `out_dir`, resuming what a
  stopped run with the same arguments left; returns the summary (also saved
  as the manifest). num_shards: for random-access sources (default: one per
  10,000 records, at least 8); sharded sources write one per input file."""
  if not 1 <= jpeg_quality <= 100:
    raise ValueError(f"--jpeg-quality {jpeg_quality}: not in 1..100")
  if runner not in ("local", "beam"):
    raise ValueError(f"--runner {runner}: not local or beam")
  if hasattr(source, "units") and num_shards:
    print(f"prepare: --num-shards ignored: {source!r} writes one shard per input file",
          file=sys.stderr)
  units = sources.units(source, num_shards)
  if not units:
    raise SourceError(f"{source!r}: no records")
  out_dir = fs.absolute(out_dir)
  options = shards.Options(resize_shorter, jpeg_quality)
  plan = shards.plan(source, units, options)
  done = shards.start(out_dir, plan, units)
  todo = [i for i in range(len(units)) if i not in set(done)]
  if done:
    print(f"prepare: {len(done)} of {len(units)} shards already written, kept", file=sys.stderr,
          flush=True)
  workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
  progress = Progress(units, todo, len(done), progress_every)
  if todo and runner == "beam":
    from pipeline import beam_runner

    beam_runner.run(out_dir, units, todo, options, beam_options, workers)
  elif todo and workers == 1:
    _run_here(out_dir, units, todo, options, progress)
  elif todo:
    _run_local(out_dir, units, todo, options, workers, progress)
  summary = shards.finish(out_dir, plan)
  seen = sum(summary["shard_records"][i] for i in todo) + sum(
      sum(shards.read_counts(out_dir, i, len(units))["skipped"].values()) for i in todo)
  elapsed = time.monotonic() - progress.t0
  print(f"prepare: done, {summary['records']:,} records in {len(units)} shards "
        f"({len(done)} kept from before), {sum(summary['skipped'].values()):,} skipped, "
        f"{len(summary['truncated'])} truncated files; {seen:,} images in {duration(elapsed)}"
        f" ({seen / max(elapsed, 1e-9):,.0f} images/s)", file=sys.stderr, flush=True)
  return summary
