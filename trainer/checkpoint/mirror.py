"""The run's CheckpointManager; for an s3:// run directory, `Mirrored`."""

from __future__ import annotations

import json
import os
import shutil
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from pipeline import fs
from trainer import faults


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
