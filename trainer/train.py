"""`capjax train`: the training loop.

The train state is created already sharded (abstract shapes first, then a
jitted initialiser with output shardings), the step is jitted with explicit
input and output shardings and donates the state, batches arrive from Grain as
global arrays on the mesh, and Orbax checkpoints every N steps. Running again
in the same workdir resumes from the latest checkpoint, data position included.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from pipeline import loader, prepare, tokenizer as tokenizer_lib, transforms
from trainer import checkpoint, config as config_lib, host_memory, sharding, writers
from trainer import flops as flops_lib, params as params_lib, step as step_lib


def prepare_tokenizer(cfg: ConfigDict, workdir: str):
  """The run's tokenizer, saved in `WORKDIR/tokenizer`; fills the decoder's
  vocabulary size and special ids into the config."""
  path = os.path.join(workdir, "tokenizer")
  if not os.path.isdir(path):
    if cfg.tokenizer.path:
      tok = tokenizer_lib.load(cfg.tokenizer.path)
      if jax.process_index() == 0:
        tok.save_pretrained(path)
    elif jax.process_index() == 0:
      captions = (c for _, caps in prepare.ids_and_captions(prepare.open_split(cfg.data, "train"))
                  for c in caps)
      tokenizer_lib.train_bpe(captions, cfg.tokenizer.vocab_size, path)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("tokenizer")
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
  cfg.tokenizer.path = os.path.join(workdir, "tokenizer")
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


def resolve_steps(cfg: ConfigDict, num_records: int) -> None:
  """`train.epochs` > 0 sets `train.steps` to cover that many passes over the
  training records (the last step's batch may run into the next pass)."""
  if cfg.train.epochs > 0:
    cfg.train.steps = math.ceil(cfg.train.epochs * num_records / cfg.train.batch_size)
  if cfg.train.steps < 1:
    raise ValueError(f"config.train.steps={cfg.train.steps}: set steps or epochs above 0")


# Scores of the periodic evaluation logged as eval/NAME.
EVAL_SCALARS = ("loss", "perplexity", "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider",
                "content_accuracy")


def _eta(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train(cfg: ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains to `cfg.train.steps`; returns the last step's metrics."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  # Saved with the checkpoint: absolute, so eval works from any directory.
  for which in ("train", "eval"):
    if ":" not in cfg.data[which]:  # tfds:NAME and hf:FOLDER name no local path
      cfg.data[which] = os.path.abspath(cfg.data[which])
  check_train_config(cfg)
  source = prepare.open_split(cfg.data, "train")
  resolve_steps(cfg, len(source))
  if jax.process_index() == 0:
    print(f"{len(source)} training records; {cfg.train.steps} steps of "
          f"{cfg.train.batch_size} images: "
          f"{cfg.train.steps * cfg.train.batch_size / len(source):.2f} epochs", flush=True)
  _, tokenizer_dir = prepare_tokenizer(cfg, workdir)
  mesh = sharding.make_mesh(cfg.mesh)
  if jax.process_index() == 0:
    shape = " x ".join(f"{a} {n}" for a, n in mesh.shape.items())
    print(f"mesh {shape} on {mesh.size} {jax.devices()[0].platform} devices, "
          f"{jax.process_count()} process(es)", flush=True)
  setup = step_lib.setup(cfg, mesh)
  graphdef, param_sh, opt_sh = setup.graphdef, setup.param_sh, setup.opt_sh

  data_iter = iter(make_loader(cfg, source, tokenizer_dir))
  mngr = checkpoint.manager(workdir, keep=cfg.checkpoint.keep)
  start = mngr.latest_step()
  if start is None and cfg.train.init_from:
    src, src_step = checkpoint.find(cfg.train.init_from)
    params = params_lib.load_params(src, src_step, checkpoint.load_config(src, src_step), cfg,
                                    mesh)
    opt_state = setup.init_opt(params)
    print(f"starting from the parameters of {src} (step {src_step})", flush=True)
    start = 0
  elif start is None:
    params, opt_state = setup.init()
    start = 0
  else:
    params, opt_state = checkpoint.restore_train_state(
        mngr, start, sharding.with_shardings(setup.abs_params, param_sh),
        sharding.with_shardings(setup.abs_opt, opt_sh), data_iter)
    logging.info("resumed from step %d", start)
    print(f"resuming from the checkpoint at step {start}", flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=1)

  step_sh = sharding.replicated(mesh)
  train_step = setup.train_step
  writer = writers.create_writer(workdir, start)
  step = jax.device_put(jnp.int32(start), step_sh)
  always = jax.device_put(jnp.bool_(True), step_sh)
  healthy = always
  total = cfg.train.steps
  t_log, s_log, wait = time.time(), start, 0.0
  pending = None  # the previous step's metrics, read while this step runs
  last: dict[str, float] = {}
  skipped = 0  # unusable records met by this process's run (data.bad_records=skip)
  nonfinite = tokens = 0
  compiled = flops = None
  peak = flops_lib.peak_flops(jax.devices()[0].device_kind, cfg.train.peak_flops)

  def log(s, metrics):
    nonlocal t_log, s_log, wait, last, skipped, nonfinite, tokens
    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
    skipped += int(last["train/skipped_records"])
    tokens += last["train/tokens"]
    writer.write_scalars(s, last)
    if last["train/nonfinite"]:
      nonfinite += 1
      if cfg.train.nonfinite == "stop":
        _stop_on_nonfinite(s, last)
      print(f"step {s}: loss {last['train/loss']}, grad norm {last['train/grad_norm']}: "
            "update skipped (train.nonfinite=skip)", flush=True)
    if s % cfg.train.log_every == 0 or s == total:
      dt = time.time() - t_log
      rate = (s - s_log) / dt
      speed = {"train/steps_per_second": rate, "train/step_time_s": 1.0 / rate,
               "train/images_per_second": rate * cfg.train.batch_size,
               "train/tokens_per_second": tokens / dt, "train/data_wait_fraction": wait / dt}
      if flops:  # XLA's count for one device's share of the step
        speed["train/tflops_per_device"] = flops * rate / 1e12
        if peak:
          speed["train/mfu"] = flops * rate / peak
      writer.write_scalars(s, speed)
      print(f"step {s}/{total}  loss {last['train/loss']:.4f}  {rate:.2f} steps/s  "
            f"ETA {_eta((total - s) / rate)}" +
            (f"  ({skipped} unusable records skipped)" if skipped else "") +
            (f"  ({nonfinite} non-finite steps skipped)" if nonfinite else ""), flush=True)
      t_log, s_log, wait, tokens = time.time(), s, 0.0, 0

  def _stop_on_nonfinite(s, metrics):
    # The step carried healthy=False since step s: the state in hand is the
    # one after step s - 1. Keep it, with the data position that goes with it.
    good = s - 1
    if good > 0 and good not in mngr.all_steps():
      position = {**data_iter.get_state(), "next_batch": good}
      checkpoint.save(mngr, good, params, opt_state, position, cfg)
    mngr.wait_until_finished()
    data_iter.close()
    writer.close()
    kept = f"the state after step {good} is checkpointed" if good > 0 else "nothing to keep"
    raise step_lib.NonFiniteLoss(
        f"step {s}: loss {metrics['train/loss']}, gradient norm {metrics['train/grad_norm']} "
        f"(not finite); {kept} (train.nonfinite=stop; =skip skips such steps)")

  evaluator = None  # the run's own model, for periodic evaluation
  best = checkpoint.best_value(workdir)

  def periodic_eval(s):
    nonlocal evaluator, best
    from trainer import evaluate
    from trainer.inference import TrainedCaptioner
    if evaluator is None:
      evaluator = TrainedCaptioner(params_lib.Restored(workdir, s, cfg, mesh, graphdef, params,
                                                       param_sh))
    evaluator.params, evaluator.step = params, s
    teacher_forced = evaluate.eval_loss(params, graphdef, cfg, mesh, tokenizer_dir)
    m = evaluate.evaluate_model(evaluator, extra=teacher_forced)
    if m is not None:
      scores = {f"eval/{k}": m[k] for k in EVAL_SCALARS if k in m}
      writer.write_scalars(s, scores)
      writer.write_texts(s, {"eval/samples": "\n\n".join(
          f"**{x['caption']}**  \n" + "  \n".join(x["references"][:2]) for x in m["samples"])})
      print(f"step {s}: eval " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in scores.items()),
            flush=True)
    key = cfg.checkpoint.best_metric
    if key:
      value = float(m[key]) if m is not None else 0.0
      if jax.process_count() > 1:  # process 0 scored; all save together
        from jax.experimental import multihost_utils
        value = float(multihost_utils.broadcast_one_to_all(jnp.float32(value)))
      lower_is_better = key in ("loss", "perplexity")
      if best is None or (value < best if lower_is_better else value > best):
        best = value
        checkpoint.save_best(workdir, s, params, cfg, key, value)

  preemption = _Preemption()
  stopped_at = None
  try:
    for s in range(start + 1, total + 1):
      if preemption.reached(s - 1):
        stopped_at = s - 1
        break
      t0 = time.time()
      batch = sharding.global_batch(next(data_iter), mesh)
      wait += time.time() - t0
      carry = healthy if cfg.train.nonfinite == "stop" else always
      if compiled is None:  # compiled ahead of the first call, for its FLOP count
        lowered = train_step.lower(params, opt_state, step, carry, batch)
        compiled = lowered.compile()
        flops = flops_lib.step_flops(lowered, mesh.size)
      params, opt_state, step, healthy, metrics = compiled(params, opt_state, step, carry, batch)
      if s == start + 1:  # the step's scratch memory, kept for the next (CPU)
        jax.block_until_ready(metrics)
        host_memory.keep_freed_memory()
      if pending is not None:
        log(*pending)
      pending = (s, metrics)
      if s % cfg.checkpoint.every_steps == 0 or s == total:
        # The metrics up to the checkpoint reach the disk with it: a run
        # killed later resumes here and logs only the steps after.
        log(*pending)
        pending = None
        writer.flush()
        checkpoint.save(mngr, s, params, opt_state, data_iter.get_state(), cfg)
      if cfg.eval.every_steps and (s % cfg.eval.every_steps == 0 or s == total):
        periodic_eval(s)
    if pending is not None:
      log(*pending)
    if stopped_at is not None and stopped_at > start and stopped_at not in mngr.all_steps():
      checkpoint.save(mngr, stopped_at, params, opt_state, data_iter.get_state(), cfg)
  finally:
    preemption.close()
  mngr.wait_until_finished()
  data_iter.close()
  writer.flush()
  writer.close()
  if stopped_at is not None:
    print(f"preempted: checkpoint at step {stopped_at}; run the same command to resume",
          flush=True)
  return last


class _Preemption:
  """A preemption notice (SIGTERM): the loop checkpoints and returns. Over
  several processes JAX's preemption service agrees on the step."""

  def __init__(self):
    self._requested = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._note)

  def _note(self, signum, frame):
    self._requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
