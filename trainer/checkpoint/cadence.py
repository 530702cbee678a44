"""Saving a run: what a checkpoint holds, when a training run saves, and
what a save that fails says (space, I/O, or a lost peer)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from pipeline import fs
from trainer import faults
from trainer.checkpoint.checksums import CHECKSUMS, checksums_of
from trainer.checkpoint.mirror import manager
from trainer.checkpoint.restore import cause, chain


def save_args(arrays: dict[str, Any], jsons: dict[str, Any]) -> ocp.args.Composite:
  """The items and their checksums (computed now, before an asynchronous save)."""
  return ocp.args.Composite(
      **{k: ocp.args.StandardSave(v) for k, v in arrays.items()},
      **{k: ocp.args.JsonSave(v) for k, v in jsons.items()},
      **{CHECKSUMS: ocp.args.JsonSave(checksums_of(arrays, jsons))})


def save(mngr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         data_state: dict, config: ConfigDict) -> None:
  mngr.save(step, args=save_args({"params": params, "opt_state": opt_state},
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

  watch = peers.current()
  if watch is not None:
    deadline = time.monotonic() + watch.timeout + 4 * watch.interval + 2
    while time.monotonic() < deadline:  # the watch's os._exit ends this wait
      time.sleep(0.2)
  step = f" of step {steps[0]}" if steps else ""
  return PeerLost(f"checkpoint{step} failed: another process of the run is gone or "
                  f"unreachable ({cause(error)}); {faults.resume_hint(workdir)}")


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
    logging.getLogger("capjax").error("a checkpoint save failed", exc_info=error)
    if jax.process_count() > 1 and any(_PEER_LOST.search(str(e)) for e in chain(error)):
      return _peer_lost(error, self._pending[-1:], os.path.dirname(str(self._mngr.directory)))
    if jax.process_index() == 0:
      self._settle()
      for path in _tmp_folders(self._mngr):
        fs.rmtree(path)
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
                                             for e in chain(error))
           else cause(error))
    return SaveFailed(
        f"checkpoint of step {failed[0]} to {self._mngr.directory} failed: {why}; "
        + (f"{free / 2**20:,.1f} MiB free there, " if free is not None else "")
        + f"about {self._nbytes / 2**20:,.1f} MiB needed; "
        f"{keep}: run the same command to resume once there is room (details: "
        f"{faults.log_path(os.path.dirname(root))})")

  def _settle(self, timeout: float = 30.0) -> None:
    """Waits (at most `timeout` seconds) for the save's background writes
    to end, their errors ignored: a write still running after the error
    would put the temporary folder back after it is removed."""
    def wait():
      try:
        self._mngr.wait_until_finished()
      except Exception:  # the failure being reported, or one like it
        pass
    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(timeout)

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
  mngr.save(step, args=save_args({"params": params}, {"config": config.to_dict()}))
  mngr.wait_until_finished()
  mngr.close()
