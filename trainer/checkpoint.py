"""Orbax checkpoints of a run: parameters, optimiser state, the data
stream's position and the config, under `WORKDIR/checkpoints/STEP/`.

Saves are asynchronous and atomic (Orbax writes into a temporary folder and
renames it when complete), so a run killed mid-save resumes from the previous
complete checkpoint; the killed save's temporary folder is removed when the
next run opens the folder for writing.

Every checkpoint carries checksums of what it holds (item `checksums`): two
32-bit sums over each array's bits, computed on the devices where the array
lives (so the same whatever the sharding), and SHA-256 of the JSON items.
A restore recomputes them; a mismatch, or a checkpoint that cannot be read,
is a `CorruptCheckpoint`. Resuming, a run sets such a checkpoint aside as
`checkpoints/corrupt-STEP` and resumes from the newest one that verifies.

A `gs://` run directory is Orbax's own: it writes there through TensorStore's
GCS driver and marks each complete step with a commit file. Orbax writes
`s3://` as a local folder, so an s3:// run's checkpoints are saved into the
process's local stage and each complete one is uploaded, its commit marker
last (`Mirrored`); a step without the marker is not a checkpoint to anyone.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from pipeline import fs
from trainer import faults

CHECKSUMS = "checksums"
CORRUPT = "corrupt-"  # checkpoints/corrupt-STEP: set aside, not deleted


class CorruptCheckpoint(ValueError):
  """A checkpoint that cannot be read, or whose contents do not match the
  checksums saved with it; the message names the step folder and the item."""


def _bits(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words, in its own shape (plus a trailing
  axis of 2 for 64-bit types): no reshape, so no data moves between devices."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  words = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, words).astype(jnp.uint32)


def _digest(x: jax.Array) -> jax.Array:
  """Two wrapping uint32 sums, exact in any order of reduction: of each word
  times an odd weight of its position (a single flipped bit always changes
  it), and of a mixed hash of word and position."""
  u = _bits(x)
  index = jnp.zeros(u.shape, jnp.uint32)
  for axis, stride in enumerate(np.cumprod((u.shape + (1,))[:0:-1])[::-1]):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(
        int(stride) % 2**32)
  weighted = jnp.sum(u * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  h = u ^ (index * jnp.uint32(0x9E3779B9))
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  mixed = jnp.sum(h ^ (h >> 16), dtype=jnp.uint32)
  return jnp.stack([weighted, mixed])


@jax.jit
def _digests(leaves: list) -> jax.Array:
  return jnp.stack([_digest(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def array_checksums(tree: Any) -> dict[str, str]:
  """{leaf path: checksum} of a tree of (possibly sharded, multi-process) arrays."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  values = np.asarray(_digests([jnp.asarray(leaf) for _, leaf in flat]))
  return {_name(path): f"{a:08x}{b:08x}" for (path, _), (a, b) in zip(flat, values.tolist())}


def _name(path: tuple) -> str:
  """decoder/h/0/attn/key/kernel for a tree path (an nnx Variable's `.value` left out)."""
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def json_checksum(value: Any) -> str:
  """SHA-256 of a JSON item as it reads back."""
  canonical = json.dumps(json.loads(json.dumps(value)), sort_keys=True)
  return hashlib.sha256(canonical.encode()).hexdigest()


def _checksums(arrays: dict[str, Any], jsons: dict[str, Any]) -> dict[str, Any]:
  return {**{k: array_checksums(v) for k, v in arrays.items()},
          **{k: json_checksum(v) for k, v in jsons.items()}}


def verify(where: str, saved: dict | None, arrays: dict[str, Any],
           jsons: dict[str, Any]) -> None:
  """Raises CorruptCheckpoint unless the restored items match `saved`, the
  checksums saved with them (None: a checkpoint written without them)."""
  if saved is None:
    return
  for item, tree in arrays.items():
    got, want = array_checksums(tree), saved.get(item, {})
    for path in sorted(set(got) | set(want)):
      if got.get(path) != want.get(path):
        raise CorruptCheckpoint(f"checkpoint {where}/{item}: array {path} does not match "
                                "the checksum saved with it")
  for item, value in jsons.items():
    if json_checksum(value) != saved.get(item):
      raise CorruptCheckpoint(f"checkpoint {where}/{item}: does not match the checksum "
                              "saved with it")


def manager(workdir: str, keep: int = 2, read_only: bool = False):
  """The run's CheckpointManager (for an s3:// run, a `Mirrored` one)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, create=not read_only,
      cleanup_tmp_directories=not read_only,  # a killed save's leftovers hold space
      save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=not read_only, read_only=read_only)
  directory = fs.join(fs.absolute(workdir), "checkpoints")
  if fs.scheme(directory) != "s3":
    return ocp.CheckpointManager(directory, options=options)
  if not read_only:
    return Mirrored(directory, options, read_only)
  if directory not in _readers:  # one stage a process: load_config, then load_params
    _readers[directory] = Mirrored(directory, options, read_only)
  return _readers[directory]


_readers: dict[str, "Mirrored"] = {}


class Mirrored:
  """An s3:// run's checkpoints, as far as capjax uses a CheckpointManager:
  Orbax saves each step into a local stage; once complete, its files are
  uploaded and then `faults.S3_COMMIT`, so a save or upload killed midway
  leaves a step that no reader lists (and the next writer removes). A
  restore downloads the items it asks for, each once (eval never fetches
  the optimiser state); a reader drops the arrays from its stage once they
  are in memory. Steps older than the oldest Orbax keeps locally are deleted
  from the bucket, marker first. The stage goes at close(). One process:
  Orbax needs one folder that every process of a run sees."""

  def __init__(self, directory: str, options: ocp.CheckpointManagerOptions, read_only: bool):
    if jax.process_count() > 1:
      raise ValueError(f"{directory}: an s3:// run directory takes one process (Orbax "
                       "cannot write S3 from several): use gs://, or a folder every host "
                       "mounts (mountpoint-s3)")
    self.directory = directory
    self._read_only = read_only
    self._stage = fs.Stage(directory)
    self._local = ocp.CheckpointManager(self._stage.root, options=options)
    self._uploaded = set(self.all_steps())
    self._upload: threading.Thread | None = None
    self._error: BaseException | None = None
    if not read_only:  # a killed upload's step: never committed, never read
      for name in fs.listdir(directory):
        if name.isdigit() and int(name) not in self._uploaded:
          fs.rmtree(fs.join(directory, name))

  def all_steps(self) -> list[int]:
    return faults.committed_steps(os.path.dirname(self.directory))

  def latest_step(self) -> int | None:
    return max(self.all_steps(), default=None)

  def reload(self) -> None:
    self._local.reload()

  def save(self, step: int, args: Any, force: bool = False) -> bool:
    """Starts the save; its upload follows in a thread once Orbax is done."""
    self._join()
    saved = self._local.save(step, args=args, force=force)
    self._upload = threading.Thread(target=self._push, name="capjax-s3-upload", daemon=True)
    self._upload.start()
    return saved

  def _push(self) -> None:
    try:
      self._local.wait_until_finished()
      for step in [s for s in self._local.all_steps() if s not in self._uploaded]:
        local = os.path.join(self._stage.root, str(step))
        remote = fs.join(self.directory, str(step))
        names = fs.copytree(local, remote)
        fs.write_text(fs.join(remote, faults.S3_COMMIT), json.dumps({"files": names}) + "\n")
        self._uploaded.add(step)
      kept = self._local.all_steps()
      for step in sorted(self._uploaded):
        if kept and step < min(kept):
          fs.remove(fs.join(self.directory, str(step), faults.S3_COMMIT))
          fs.rmtree(fs.join(self.directory, str(step)))
          self._uploaded.discard(step)
    except BaseException as e:  # raised in the thread that waits
      self._error = e

  def _join(self) -> None:
    if self._upload is not None:
      self._upload.join()
      self._upload = None
    if self._error is not None:
      error, self._error = self._error, None
      raise error

  def wait_until_finished(self) -> None:
    """Until the local save is complete and every complete step uploaded."""
    self._join()
    self._local.wait_until_finished()

  def restore(self, step: int, args: Any) -> Any:
    local = os.path.join(self._stage.root, str(step))
    remote = fs.join(self.directory, str(step))
    fetched = []
    if not os.path.isdir(local):  # the step's own files (Orbax's metadata), not its items
      for name in fs.listdir(remote):
        if name != faults.S3_COMMIT and fs.isfile(fs.join(remote, name)):
          fs.copy(fs.join(remote, name), os.path.join(local, name))
    for item in args.keys():
      if not os.path.isdir(os.path.join(local, item)):
        fs.copytree(fs.join(remote, item), os.path.join(local, item))
        fetched.append(item)
    self._local.reload()
    try:
      return self._local.restore(step, args=args)
    finally:
      if self._read_only:  # in memory now (or unreadable): no second copy on disk
        for item in fetched:
          if not isinstance(args[item], ocp.args.JsonRestore):
            shutil.rmtree(os.path.join(local, item), ignore_errors=True)

  def set_aside(self, step: int, target: str) -> None:
    fs.remove(fs.join(self.directory, str(step), faults.S3_COMMIT))
    fs.move(fs.join(self.directory, str(step)), target)
    shutil.rmtree(os.path.join(self._stage.root, str(step)), ignore_errors=True)
    self._uploaded.discard(step)

  def close(self) -> None:
    self.wait_until_finished()
    self._local.close()
    shutil.rmtree(self._stage.root, ignore_errors=True)
    if _readers.get(self.directory) is self:
      del _readers[self.directory]


def _save_args(arrays: dict[str, Any], jsons: dict[str, Any]) -> ocp.args.Composite:
  """The items and their checksums (computed now, before an asynchronous save)."""
  return ocp.args.Composite(
      **{k: ocp.args.StandardSave(v) for k, v in arrays.items()},
      **{k: ocp.args.JsonSave(v) for k, v in jsons.items()},
      **{CHECKSUMS: ocp.args.JsonSave(_checksums(arrays, jsons))})


def save(mngr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         data_state: dict, config: ConfigDict) -> None:
  mngr.save(step, args=_save_args({"params": params, "opt_state": opt_state},
                                  {"data": data_state, "config": config.to_dict()}))


class SaveFailed(OSError):
  """A checkpoint could not be written (a full disk, an I/O error); its
  temporary folder is gone and the message says what to do."""


class PeerLost(SaveFailed):
  """A checkpoint's collective failed because another process of the run is
  gone (killed, or its host lost): not a matter of disk space."""


# A collective whose other end is gone: Gloo's errors on CPU, the coordination
# service's on any platform.
_PEER_LOST = re.compile(r"Gloo \w+ failed|Connection (closed|reset) by peer|[Cc]oordination "
                        r"service|heartbeat|UNAVAILABLE|DEADLINE_EXCEEDED: Barrier")


def _peer_lost(error: BaseException, steps: list[int], workdir: str) -> PeerLost:
  """The run's peer watch names the lost process and stops this one (it
  exits from its own thread within its timeout); without a watch, or if it
  never concludes, the save's own error is reported as a lost peer."""
  import time
  from trainer import peers

  logging.getLogger("capjax").error("a checkpoint save failed", exc_info=error)
  watch = peers.current()
  if watch is not None:
    deadline = time.monotonic() + watch.timeout + 4 * watch.interval + 2
    while time.monotonic() < deadline:  # the watch's os._exit ends this wait
      time.sleep(0.2)
  step = f" of step {steps[0]}" if steps else ""
  return PeerLost(f"checkpoint{step} failed: another process of the run is gone or "
                  f"unreachable ({_cause(error)}); {faults.resume_hint(workdir)}")


def _tmp_folders(mngr: ocp.CheckpointManager) -> list[str]:
  root = str(mngr.directory)
  return [fs.join(root, n) for n in fs.listdir(root) if ".orbax-checkpoint-tmp" in n]


class Cadence:
  """A training run's saves: every `checkpoint.every_steps` steps and at the
  last step, each with the data stream's position after that step. A save
  that fails (in the background, so seen at the next save or wait) raises
  SaveFailed."""

  def __init__(self, mngr: ocp.CheckpointManager, cfg: ConfigDict, data_iter: Any):
    self._mngr, self._cfg, self._data_iter = mngr, cfg, data_iter
    self._pending: list[int] = []  # steps saved since the last wait
    self._nbytes = 0

  def _failed(self, error: BaseException) -> SaveFailed:
    """Removes the failed save's temporary folder (this run's: it holds the
    directory) and says what failed, the space, and what is kept. A save
    that failed because another process is gone is a PeerLost instead."""
    if jax.process_count() > 1 and any(_PEER_LOST.search(str(e)) for e in _chain(error)):
      return _peer_lost(error, self._pending[-1:], os.path.dirname(str(self._mngr.directory)))
    if jax.process_index() == 0:
      for path in _tmp_folders(self._mngr):
        fs.rmtree(path)
    logging.getLogger("capjax").error("a checkpoint save failed", exc_info=error)
    self._mngr.reload()
    kept = set(self._mngr.all_steps())
    failed = [s for s in self._pending if s not in kept] or self._pending[-1:]
    root = str(self._mngr.directory)
    free = None if fs.is_bucket(root) else shutil.disk_usage(root).free
    last = self._mngr.latest_step()
    keep = (f"the last complete checkpoint is step {last}" if last is not None
            else "no checkpoint is complete")
    why = ("no space left on device" if any("No space left on device" in str(e) or
                                             "os_error_code='28'" in str(e)
                                             for e in _chain(error))
           else _cause(error))
    return SaveFailed(
        f"checkpoint of step {failed[0]} to {self._mngr.directory} failed: {why}; "
        + (f"{free / 2**20:,.1f} MiB free there, " if free is not None else "")
        + f"about {self._nbytes / 2**20:,.1f} MiB needed; "
        f"{keep}: run the same command to resume once there is room (details: "
        f"{faults.log_path(os.path.dirname(root))})")

  def _guarded(self, call, *args, **kwargs) -> None:
    try:
      call(*args, **kwargs)
    except SaveFailed:
      raise
    except Exception as e:
      raise self._failed(e) from e

  def due(self, step: int) -> bool:
    return step % self._cfg.checkpoint.every_steps == 0 or step == self._cfg.train.steps

  def save(self, step: int, params: Any, opt_state: Any, next_batch: int | None = None) -> None:
    """`next_batch` when the stream has read past the step."""
    position = self._data_iter.get_state()
    if next_batch is not None:
      position = {**position, "next_batch": next_batch}
    self._nbytes = sum(x.nbytes for x in jax.tree.leaves((params, opt_state)))
    self._pending.append(step)
    self._guarded(save, self._mngr, step, params, opt_state, position, self._cfg)

  def save_if_new(self, step: int, params: Any, opt_state: Any,
                  next_batch: int | None = None) -> None:
    """Saves the state after `step` unless it is step 0 or already saved (a
    run stopping early)."""
    if step > 0 and step not in self._mngr.all_steps():
      self.save(step, params, opt_state, next_batch)

  def wait(self) -> None:
    """Until every save in flight is complete."""
    self._guarded(self._mngr.wait_until_finished)
    self._pending = []


def save_params(workdir: str, step: int, params: Any, config: ConfigDict) -> None:
  """A checkpoint of parameters and config alone (an imported model)."""
  mngr = manager(workdir)
  mngr.save(step, args=_save_args({"params": params}, {"config": config.to_dict()}))
  mngr.wait_until_finished()
  mngr.close()


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return fs.join(str(mngr.directory), str(step))


def _restore(mngr: ocp.CheckpointManager, step: int, arrays: dict[str, Any],
             jsons: tuple[str, ...]) -> dict[str, Any]:
  """The named items of checkpoint `step`, verified against its checksums."""
  where = step_dir(mngr, step)
  has_sums = fs.isdir(fs.join(where, CHECKSUMS))
  names = jsons + ((CHECKSUMS,) if has_sums else ())
  try:
    out = mngr.restore(step, args=ocp.args.Composite(
        **{k: ocp.args.StandardRestore(v) for k, v in arrays.items()},
        **{k: ocp.args.JsonRestore() for k in names}))
  except Exception as e:  # any read or decode error
    _quiet_abandoned_reads()
    raise CorruptCheckpoint(f"checkpoint {where}: cannot be read: {_cause(e)}") from e
  items = {k: out[k] for k in (*arrays, *jsons)}
  verify(where, out[CHECKSUMS] if has_sums else None, {k: items[k] for k in arrays},
         {k: items[k] for k in jsons})
  return items


def _chain(e: BaseException) -> list[BaseException]:
  """The error and those it was raised from, outermost first."""
  chain = [e]
  while chain[-1].__cause__ is not None:
    chain.append(chain[-1].__cause__)
  return chain


def _cause(e: BaseException) -> str:
  """The first line of the innermost error (TensorStore's names the file)."""
  lines = str(_chain(e)[-1]).strip().splitlines()
  return (lines[0] if lines else type(e).__name__)[:400]


_READ_ERROR = "Encountered error while reading array index"


def _quiet_abandoned_reads() -> None:
  """A failed restore leaves the other reads of its item running; as they
  end, Python and asyncio report each on stderr (a traceback of TensorStore's
  spec, or an event loop that is closed). The failure is reported in one line."""
  previous = sys.unraisablehook
  if getattr(previous, "capjax", False):
    return

  def hook(unraisable) -> None:
    text = str(unraisable.exc_value)
    if not (text.startswith(_READ_ERROR) or text == "Event loop is closed"):
      previous(unraisable)

  def abandoned(record: logging.LogRecord) -> bool:  # asyncio's "never retrieved"
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and str(exc).startswith(_READ_ERROR))

  hook.capjax = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(abandoned)
  gc.collect()


def _agree(ok: bool) -> bool:
  """Whether every process got `ok` (a read error may strike one process only)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def set_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  """Moves checkpoint `step` to `checkpoints/corrupt-STEP` (kept for a
  person to look at, out of the way of saves and restores); returns that path."""
  where = step_dir(mngr, step)
  target = fs.join(os.path.dirname(where), f"{CORRUPT}{step}")
  n = 1
  while fs.exists(target):
    n += 1
    target = fs.join(os.path.dirname(where), f"{CORRUPT}{step}-{n}")
  if isinstance(mngr, Mirrored):
    mngr.set_aside(step, target)
  elif jax.process_index() == 0:
    fs.move(where, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"set aside {step}")
  mngr.reload()
  return target


def restore_train_state(mngr: ocp.CheckpointManager, abstract_params: Any,
                        abstract_opt_state: Any, data_iter: Any) -> tuple[int, Any, Any] | None:
  """(step, params, opt_state) of the newest checkpoint that verifies, with
  the given shardings, and the data stream's position set in place (saved
  by any number of processes); None without checkpoints. Newer checkpoints
  that fail are set aside, each reported in one line; if none verifies,
  nothing is moved and the newest one's error is raised."""
  failed: list[tuple[int, CorruptCheckpoint]] = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      out, error = _restore(mngr, step, {"params": abstract_params,
                                         "opt_state": abstract_opt_state}, ("data",)), None
    except CorruptCheckpoint as e:
      out, error = None, e
    if not _agree(error is None):
      failed.append((step, error or CorruptCheckpoint(
          f"checkpoint {step_dir(mngr, step)}: cannot be read by another process")))
      continue
    for bad, e in failed:
      print(f"{e}; moved it to {set_aside(mngr, bad)}, resuming from step {step}", flush=True)
    saved, now = out["data"].get("stream"), data_iter.get_state().get("stream")
    if saved != now:
      print(f"note: the checkpoint's data stream was {saved}; continuing at its batch "
            f"{out['data']['next_batch']} of {now}", flush=True)
    data_iter.set_state(out["data"])
    return step, out["params"], out["opt_state"]
  if failed:
    raise CorruptCheckpoint(f"{failed[0][1]}" + (
        f"; nor do the {len(failed) - 1} before it verify (nothing moved)"
        if len(failed) > 1 else ""))
  return None


BEST = "best"  # WORKDIR/best: a run directory of its own, the best model so far


def save_best(workdir: str, step: int, params: Any, config: ConfigDict, metric: str,
              value: float) -> None:
  """The model scoring highest so far on `metric` into WORKDIR/best (with the
  tokenizer, so `eval`, `predict` and `export-hf` take it as they take a run)."""
  best = fs.join(workdir, BEST)
  mngr = manager(best, keep=1)
  mngr.save(step, args=_save_args({"params": params}, {"config": config.to_dict()}), force=True)
  mngr.wait_until_finished()
  mngr.close()
  if jax.process_index() == 0:
    if not fs.isdir(fs.join(best, "tokenizer")):
      fs.copytree(fs.join(workdir, "tokenizer"), fs.join(best, "tokenizer"))
    fs.write_text(fs.join(best, "best.json"),
                  json.dumps({"step": step, "metric": metric, "value": value}) + "\n")


def best_value(workdir: str) -> float | None:
  """The score of WORKDIR/best, if any (a resumed run keeps beating it)."""
  path = fs.join(workdir, BEST, "best.json")
  if not fs.exists(path):
    return None
  return float(json.loads(fs.read_text(path))["value"])


def find(path: str) -> tuple[str, int]:
  """A run directory, its `checkpoints/` folder or one step folder, to
  (run directory, step); the latest step unless one is named."""
  workdir, steps = candidates(path)
  return workdir, steps[0]


def candidates(path: str) -> tuple[str, list[int]]:
  """A run directory, its `checkpoints/` folder or one step folder, to (run
  directory, steps to try, newest first): just the one step if one is named."""
  path = fs.absolute(path)
  if not fs.isdir(path):
    raise FileNotFoundError(f"--checkpoint {path}: no such directory")
  base = os.path.basename(path)
  if base.isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
    return os.path.dirname(os.path.dirname(path)), [int(base)]
  workdir = os.path.dirname(path) if base == "checkpoints" else path
  steps = sorted(manager(workdir, read_only=True).all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f"--checkpoint {path}: holds no complete checkpoint")
  return workdir, steps


def load_config(workdir: str, step: int) -> ConfigDict:
  return ConfigDict(_restore(manager(workdir, read_only=True), step, {}, ("config",))["config"])


def load_params(workdir: str, step: int, abstract_params: Any) -> Any:
  return _restore(manager(workdir, read_only=True), step, {"params": abstract_params},
                  ())["params"]
