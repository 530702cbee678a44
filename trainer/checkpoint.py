"""Orbax checkpoints of a run: parameters, optimiser state, the data
stream's position and the config, under `WORKDIR/checkpoints/STEP/`.

Saves are asynchronous and atomic (Orbax writes into a temporary folder and
renames it when complete), so a run killed mid-save resumes from the previous
complete checkpoint; the killed save's temporary folder is removed when the
next run opens the folder for writing.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from pipeline import atomic


def manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, create=not read_only,
      cleanup_tmp_directories=not read_only,  # a killed save's leftovers hold space
      save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=not read_only, read_only=read_only)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save(mngr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         data_state: dict, config: ConfigDict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(config.to_dict()),
  ))


class Cadence:
  """A training run's saves: every `checkpoint.every_steps` steps and at the
  last step, each with the data stream's position after that step."""

  def __init__(self, mngr: ocp.CheckpointManager, cfg: ConfigDict, data_iter: Any):
    self._mngr, self._cfg, self._data_iter = mngr, cfg, data_iter

  def due(self, step: int) -> bool:
    return step % self._cfg.checkpoint.every_steps == 0 or step == self._cfg.train.steps

  def save(self, step: int, params: Any, opt_state: Any, next_batch: int | None = None) -> None:
    """`next_batch` when the stream has read past the step."""
    position = self._data_iter.get_state()
    if next_batch is not None:
      position = {**position, "next_batch": next_batch}
    save(self._mngr, step, params, opt_state, position, self._cfg)

  def save_if_new(self, step: int, params: Any, opt_state: Any,
                  next_batch: int | None = None) -> None:
    """Saves the state after `step` unless it is step 0 or already saved (a
    run stopping early)."""
    if step > 0 and step not in self._mngr.all_steps():
      self.save(step, params, opt_state, next_batch)

  def wait(self) -> None:
    """Until every save in flight is complete."""
    self._mngr.wait_until_finished()


def save_params(workdir: str, step: int, params: Any, config: ConfigDict) -> None:
  """A checkpoint of parameters and config alone (an imported model)."""
  mngr = manager(workdir)
  mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                          config=ocp.args.JsonSave(config.to_dict())))
  mngr.wait_until_finished()
  mngr.close()


def restore_train_state(mngr: ocp.CheckpointManager, step: int, abstract_params: Any,
                        abstract_opt_state: Any, data_iter: Any) -> tuple[Any, Any]:
  """Restores parameters and optimiser state with the given shardings, and the
  data stream's position in place (saved by any number of processes)."""
  out = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_opt_state),
      data=ocp.args.JsonRestore(),
  ))
  saved, now = out.data.get("stream"), data_iter.get_state().get("stream")
  if saved != now:
    print(f"note: the checkpoint's data stream was {saved}; continuing at its batch "
          f"{out.data['next_batch']} of {now}", flush=True)
  data_iter.set_state(out.data)
  return out.params, out.opt_state


BEST = "best"  # WORKDIR/best: a run directory of its own, the best model so far


def save_best(workdir: str, step: int, params: Any, config: ConfigDict, metric: str,
              value: float) -> None:
  """The model scoring highest so far on `metric` into WORKDIR/best (with the
  tokenizer, so `eval`, `predict` and `export-hf` take it as they take a run)."""
  import jax
  best = os.path.join(workdir, BEST)
  mngr = manager(best, keep=1)
  mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                          config=ocp.args.JsonSave(config.to_dict())),
            force=True)
  mngr.wait_until_finished()
  mngr.close()
  if jax.process_index() == 0:
    if not os.path.isdir(os.path.join(best, "tokenizer")):
      shutil.copytree(os.path.join(workdir, "tokenizer"), os.path.join(best, "tokenizer"))
    atomic.write_text(os.path.join(best, "best.json"),
                      json.dumps({"step": step, "metric": metric, "value": value}) + "\n")


def best_value(workdir: str) -> float | None:
  """The score of WORKDIR/best, if any (a resumed run keeps beating it)."""
  path = os.path.join(workdir, BEST, "best.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return float(json.load(f)["value"])


def find(path: str) -> tuple[str, int]:
  """A run directory, its `checkpoints/` folder or one step folder, to
  (run directory, step); the latest step unless one is named."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--checkpoint {path}: no such directory")
  base = os.path.basename(path)
  if base.isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
    return os.path.dirname(os.path.dirname(path)), int(base)
  workdir = os.path.dirname(path) if base == "checkpoints" else path
  step = manager(workdir, read_only=True).latest_step()
  if step is None:
    raise FileNotFoundError(f"--checkpoint {path}: holds no complete checkpoint")
  return workdir, step


def load_config(workdir: str, step: int) -> ConfigDict:
  out = manager(workdir, read_only=True).restore(
      step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ConfigDict(out.config)


def load_params(workdir: str, step: int, abstract_params: Any) -> Any:
  out = manager(workdir, read_only=True).restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
  return out.params
