"""`capjax train`: the training loop.

The train state is created already sharded (abstract shapes first, then a
jitted initialiser with output shardings), the step is jitted with explicit
input and output shardings and donates the state, batches arrive from Grain as
global arrays on the mesh, and Orbax checkpoints every N steps. Running again
in the same workdir resumes from the latest checkpoint, data position included.

The loop calls its parts, each with its own state: `step.StepRunner` (the
compiled step and what it carries), `step_log.StepLog` (scalars, speed, the
console), `checkpoint.Cadence` (when to save), `periodic_eval.PeriodicEval`
(scores and the best model) and `preemption.Preemption` (SIGTERM).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
from ml_collections import ConfigDict

from pipeline import fs, loader, mixture, tokenizer as tokenizer_lib, transforms
from trainer import checkpoint, config as config_lib, faults, sharding, writers
from trainer import flops as flops_lib, params as params_lib, scst, step as step_lib
from trainer.periodic_eval import EVAL_SCALARS, PeriodicEval
from trainer.preemption import Preemption
from trainer.step_log import NonFiniteStep, StepLog


def prepare_tokenizer(cfg: ConfigDict, stage: fs.Stage):
  """The run's tokenizer, saved in `WORKDIR/tokenizer`; fills the decoder's
  vocabulary size and special ids into the config. Returns it and its local
  folder (in the stage of a bucket run)."""
  path = stage.local("tokenizer")
  if not fs.isdir(fs.join(stage.workdir, "tokenizer")):
    if cfg.tokenizer.path:
      tok = tokenizer_lib.load(cfg.tokenizer.path)
      if jax.process_index() == 0:
        tok.save_pretrained(path)
    elif jax.process_index() == 0:
      captions = (c for _, caps in mixture.ids_and_captions(mixture.open_train(cfg.data))
                  for c in caps)
      tokenizer_lib.train_bpe(captions, cfg.tokenizer.vocab_size, path)
    if jax.process_index() == 0:
      stage.push("tokenizer")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("tokenizer")
  if not os.path.isdir(path):
    stage.pull("tokenizer")
  tok = tokenizer_lib.load(path)
  dec = cfg.model.decoder
  if dec.vocab_size == 0:
    dec.vocab_size = len(tok)
  if "eos_token_id" not in dec:  # an imported model keeps its own (decoder_start_token_id)
    dec.bos_token_id, dec.eos_token_id, dec.pad_token_id = tokenizer_lib.special_ids(tok)
  return tok, path


def inherit_from_checkpoint(cfg: ConfigDict, overrides: list[str]) -> ConfigDict:
  """With `train.init_from` (e.g. a run directory from `import-hf`): that
  checkpoint's architecture, image preprocessing and tokenizer, so that a
  fine-tuning config need not repeat them. Command-line overrides still win."""
  if not cfg.train.init_from:
    return cfg
  workdir, step = checkpoint.find(cfg.train.init_from)
  saved = checkpoint.load_config(workdir, step)
  cfg.model.encoder = saved.model.encoder
  cfg.model.decoder = saved.model.decoder
  cfg.model.image_mean = tuple(saved.model.image_mean)
  cfg.model.image_std = tuple(saved.model.image_std)
  for key in ("image_size", "resize", "resample"):
    cfg.data[key] = saved.data[key]
  cfg.data.crop_fraction = saved.data.get("crop_fraction", 1.0)
  cfg.tokenizer.path = fs.join(workdir, "tokenizer")
  return config_lib.apply_overrides(cfg, overrides)


def make_loader(cfg: ConfigDict, source: Any, tokenizer_dir: str) -> loader.BatchStream:
  """This process's share of each global batch of the training `source`:
  shuffled by the seed, endless, built in worker processes."""
  from absl import flags
  if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags
    flags.FLAGS.mark_as_parsed()
  make_batch = transforms.TrainBatch.from_config(cfg, tokenizer_dir)
  return loader.train_stream(source, make_batch, cfg.train.batch_size, cfg.seed,
                             jax.process_index(), jax.process_count(),
                             cfg.data.worker_count, cfg.data.prefetch)


def check_train_config(cfg: ConfigDict) -> None:
  t = cfg.train
  if t.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={t.batch_size} does not divide over "
                     f"{jax.process_count()} processes")
  if t.accum_steps < 1 or t.batch_size % t.accum_steps:
    raise ValueError(f"train.accum_steps={t.accum_steps} does not divide "
                     f"train.batch_size={t.batch_size}")
  if t.nonfinite not in ("stop", "skip"):
    raise ValueError(f"train.nonfinite: {t.nonfinite!r} is not stop or skip")
  if cfg.checkpoint.best_metric and (cfg.checkpoint.best_metric not in EVAL_SCALARS
                                     or not cfg.eval.every_steps):
    raise ValueError(f"checkpoint.best_metric={cfg.checkpoint.best_metric!r} needs "
                     f"eval.every_steps > 0 and one of {', '.join(EVAL_SCALARS)}")
  if not 0.0 <= t.label_smoothing < 1.0:
    raise ValueError(f"train.label_smoothing={t.label_smoothing} is not in [0, 1)")
  if t.get("objective", "xent") not in ("xent", "scst"):
    raise ValueError(f"train.objective: {t.objective!r} is not xent or scst")


def resolve_steps(cfg: ConfigDict, num_records: int) -> None:
  """`train.epochs` > 0 sets `train.steps` to cover that many passes over the
  training records (the last step's batch may run into the next pass)."""
  if cfg.train.epochs > 0:
    cfg.train.steps = math.ceil(cfg.train.epochs * num_records / cfg.train.batch_size)
  if cfg.train.steps < 1:
    raise ValueError(f"config.train.steps={cfg.train.steps}: set steps or epochs above 0")


def _start_run(cfg: ConfigDict, stage: fs.Stage):
  """Checks the config and opens what the run reads: the training records,
  the tokenizer, the mesh and the compiled setup."""
  fs.makedirs(stage.workdir)
  # Saved with the checkpoint: absolute, so eval works from any directory.
  cfg.data.train = mixture.absolute(cfg.data.train)
  if ":" not in cfg.data.eval:  # tfds:NAME and hf:FOLDER name no local path
    cfg.data.eval = os.path.abspath(cfg.data.eval)
  check_train_config(cfg)
  source = mixture.open_train(cfg.data)
  resolve_steps(cfg, len(source))
  if jax.process_index() == 0:
    print(f"{len(source)} training records; {cfg.train.steps} steps of "
          f"{cfg.train.batch_size} images: "
          f"{cfg.train.steps * cfg.train.batch_size / len(source):.2f} epochs", flush=True)
    if isinstance(source, mixture.Mixture):
      print("mixture: " + ", ".join(f"{n} {len(s)} records x {w:.3g}" for n, s, w in
                                    zip(source.names, source.sources, source.weights)), flush=True)
  _, tokenizer_dir = prepare_tokenizer(cfg, stage)
  mesh = sharding.make_mesh(cfg.mesh)
  if jax.process_index() == 0:
    shape = " x ".join(f"{a} {n}" for a, n in mesh.shape.items())
    print(f"mesh {shape} on {mesh.size} {jax.devices()[0].platform} devices, "
          f"{jax.process_count()} process(es)", flush=True)
  return source, tokenizer_dir, mesh, step_lib.setup(cfg, mesh)


def _initial_state(cfg: ConfigDict, mngr, setup: step_lib.Setup, mesh, data_iter):
  """(step, params, opt_state): the newest checkpoint's that verifies, with
  the data stream's position restored; else `train.init_from`'s parameters;
  else fresh."""
  restored = checkpoint.restore_train_state(
      mngr, sharding.with_shardings(setup.abs_params, setup.param_sh),
      sharding.with_shardings(setup.abs_opt, setup.opt_sh), data_iter)
  if restored is not None:
    start, params, opt_state = restored
    logging.info("resumed from step %d", start)
    print(f"resuming from the checkpoint at step {start}", flush=True)
    return start, params, opt_state
  if cfg.train.init_from:
    src, src_step = checkpoint.find(cfg.train.init_from)
    params = params_lib.load_params(src, src_step, checkpoint.load_config(src, src_step), cfg,
                                    mesh)
    print(f"starting from the parameters of {src} (step {src_step})", flush=True)
    return 0, params, setup.init_opt(params)
  return 0, *setup.init()


def train(cfg: ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains to `cfg.train.steps`; returns the last step's metrics."""
  workdir = fs.absolute(workdir)
  faults.guard(workdir)
  stage = fs.Stage(workdir)
  source, tokenizer_dir, mesh, setup = _start_run(cfg, stage)
  data_iter = iter(make_loader(cfg, source, tokenizer_dir))
  mngr = checkpoint.manager(workdir, keep=cfg.checkpoint.keep)
  start, params, opt_state = _initial_state(cfg, mngr, setup, mesh, data_iter)
  if jax.process_index() == 0:
    fs.write_text(fs.join(workdir, "config.json"), json.dumps(cfg.to_dict(), indent=1))

  run_step = step_lib.StepRunner(setup, cfg, mesh, start)
  writer = writers.create_writer(workdir, start, stage)
  log = StepLog(cfg, writer, start, lambda: run_step.flops,
                flops_lib.peak_flops(jax.devices()[0].device_kind, cfg.train.peak_flops),
                samples=_samples_drawn(cfg, source))
  saves = checkpoint.Cadence(mngr, cfg, data_iter)
  periodic_eval = PeriodicEval(cfg, workdir, mesh, setup.graphdef, setup.param_sh,
                               tokenizer_dir, writer)
  critic = (scst.Critic(cfg, setup.graphdef, mesh, setup.param_sh, tokenizer_dir, workdir)
            if cfg.train.get("objective", "xent") == "scst" else None)
  preemption = Preemption()
  done = start  # the step whose state is in hand
  try:
    while done < cfg.train.steps and not preemption.reached(done):
      t0 = time.time()
      local = next(data_iter)
      log.waited(time.time() - t0)
      rewards = {}
      if critic is not None:  # sampled captions and their advantages replace the captions
        local, rewards = critic(params, local, done)
      params, opt_state, metrics = run_step(params, opt_state,
                                            sharding.global_batch(local, mesh))
      metrics = {**metrics, **rewards}
      done += 1
      log.push(done, metrics)
      if saves.due(done):
        log.flush()  # the metrics up to a checkpoint reach the disk with it
        saves.save(done, params, opt_state)
      if periodic_eval.due(done):
        periodic_eval(done, params)
    log.flush()
  except NonFiniteStep as e:
    raise _stop_on_nonfinite(e, saves, params, opt_state, data_iter, writer) from None
  finally:
    preemption.close()
  preempted = done < cfg.train.steps
  if preempted:
    saves.save_if_new(done, params, opt_state)
  _close(saves, data_iter, writer)
  if preempted:
    print(f"preempted: checkpoint at step {done}; run the same command to resume", flush=True)
  return log.last


def _samples_drawn(cfg: ConfigDict, source: Any):
  """For a mixture: step -> {source name: samples drawn from it through that
  step}, the global stream's count; else None."""
  if not isinstance(source, mixture.Mixture):
    return None
  order = source.order(cfg.seed)
  return lambda step: dict(zip(source.names,
                               order.counts(step * cfg.train.batch_size).tolist()))


def _stop_on_nonfinite(e: NonFiniteStep, saves: checkpoint.Cadence, params, opt_state,
                       data_iter, writer) -> step_lib.NonFiniteLoss:
  """Keeps the last good state and closes the run; the error to raise.
  The step carried healthy=False since step e.step, so the state in hand is
  the one after the step before: saved with that step's data position."""
  good = e.step - 1
  saves.save_if_new(good, params, opt_state, next_batch=good)
  _close(saves, data_iter, writer)
  kept = f"the state after step {good} is checkpointed" if good > 0 else "nothing to keep"
  return step_lib.NonFiniteLoss(
      f"step {e.step}: loss {e.metrics['train/loss']}, gradient norm "
      f"{e.metrics['train/grad_norm']} (not finite); {kept} "
      "(train.nonfinite=stop; =skip skips such steps)")


def _close(saves: checkpoint.Cadence, data_iter, writer) -> None:
  saves.wait()
  data_iter.close()
  writer.flush()
  writer.close()
