"""Reading checkpoints back, verified, falling back past corrupt ones."""

from __future__ import annotations

import gc
import logging
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from pipeline import fs
from trainer.checkpoint.checksums import CHECKSUMS, CorruptCheckpoint, verify
from trainer.checkpoint.mirror import Mirrored, manager


CORRUPT = "corrupt-"  # checkpoints/corrupt-STEP: set aside, not deleted


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
    raise CorruptCheckpoint(f"checkpoint {where}: cannot be read: {cause(e)}") from e
  items = {k: out[k] for k in (*arrays, *jsons)}
  verify(where, out[CHECKSUMS] if has_sums else None, {k: items[k] for k in arrays},
         {k: items[k] for k in jsons})
  return items


def chain(e: BaseException) -> list[BaseException]:
  """The error and those it was raised from, outermost first."""
  chain = [e]
  while chain[-1].__cause__ is not None:
    chain.append(chain[-1].__cause__)
  return chain


def cause(e: BaseException) -> str:
  """The first line of the innermost error (TensorStore's names the file)."""
  lines = str(chain(e)[-1]).strip().splitlines()
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


def load_config(workdir: str, step: int) -> ConfigDict:
  cfg = ConfigDict(_restore(manager(workdir, read_only=True), step, {}, ("config",))["config"])
  if "prompt" not in cfg.model:  # saved before model.prompt: none
    cfg.model.prompt = ""
  return cfg


def load_params(workdir: str, step: int, abstract_params: Any) -> Any:
  return _restore(manager(workdir, read_only=True), step, {"params": abstract_params},
                  ())["params"]
