"""The train step: cross-entropy averaged over the non-padding tokens of the
whole global batch (label smoothing optional; for SCST, where the batch has
an `advantage` per caption, the advantage-weighted negative log-probability
under the distribution the captions were sampled from), gradient accumulation over
micro-batches, and a guard that never applies a non-finite update.

The whole batch's token count is known before the gradient (the loss
mask's sum), so each token's loss is weighted by its reciprocal inside the
gradient: the gradients come out as the mean's, with no pass over them
afterwards, and k micro-batches of B sum to what one batch of kB gives (to
float rounding), whatever the padding in each.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from trainer import generate


class NonFiniteLoss(ValueError):
  """A step whose loss or gradients were not finite (`train.nonfinite=stop`)."""


def token_losses(params, graphdef, batch, key=None, label_smoothing: float = 0.0,
                 policy: tuple[float, float, int] | None = None):
  """(sum of the per-token losses over non-padding tokens, their count).
  Dropout (at the config's rates) when `key` is given. `policy`
  (temperature, top_p, top_k): with an `advantage` in the batch, the
  log-probabilities are those of the distribution the samples were drawn
  from (generate.truncate), so that lowering a bad sample's probability
  moves it to the tokens that could have been drawn instead."""
  logits = nnx.merge(graphdef, params)(batch["image"], batch["input_ids"], key)
  labels = batch["labels"]
  if "advantage" in batch:  # SCST (trainer/scst.py): -A log p of each sampled token
    if policy is not None:
      x = generate.truncate(logits.reshape(-1, logits.shape[-1]), *policy).reshape(logits.shape)
      # the sampled token stays in even where rounding put it at the cut
      x = jnp.where(jax.nn.one_hot(labels, x.shape[-1], dtype=bool), logits / policy[0], x)
      # references (train.scst.xent_weight) keep the model's own softmax
      logits = x if "sampled" not in batch else jnp.where(
          batch["sampled"][..., None, None] > 0, x, logits)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    ce = ce * batch["advantage"][..., None]
  elif label_smoothing:
    # transformers' label smoothing: (1 - e) * NLL + e * mean over the vocabulary of -log p.
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    ce = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  mask = batch["loss_mask"]
  return (ce * mask).sum(), mask.sum()


def loss_fn(params, graphdef, batch, key=None, label_smoothing: float = 0.0,
            policy: tuple[float, float, int] | None = None):
  """Mean loss over the batch's non-padding tokens, and their count."""
  total, tokens = token_losses(params, graphdef, batch, key, label_smoothing, policy)
  tokens = jnp.maximum(tokens, 1.0)
  return total / tokens, tokens


def micro_batches(batch: dict, k: int, batch_sharding=None) -> dict:
  """[B, ...] to [k, B/k, ...]. Micro-batch j holds rows j, j+k, j+2k, ...:
  every device's block of rows contributes to each, so none moves."""
  out = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1),
                     batch)
  if batch_sharding is not None:
    spec = batch_sharding.spec
    out = jax.lax.with_sharding_constraint(
        out, jax.tree.map(lambda x: jax.sharding.NamedSharding(
            batch_sharding.mesh, jax.sharding.PartitionSpec(None, *spec)), out))
  return out


def split_trained(params, trained: Callable | None):
  """(the trained parameters, the frozen rest) by an `nnx` filter; all
  trained without one."""
  if trained is None:
    return params, nnx.State({})
  return nnx.split_state(params, trained, ...)


def make_train_step(graphdef, tx, schedule, seed: int = 0, accum_steps: int = 1,
                    label_smoothing: float = 0.0, batch_sharding=None,
                    trained: Callable | None = None,
                    policy: tuple[float, float, int] | None = None):
  """step(params, opt_state, step, healthy, batch) ->
  (params, opt_state, step + 1, healthy, metrics).

  Gradients and the optimiser (`opt_state` = tx.init of the trained part)
  cover only the parameters the `trained` filter picks (all without one):
  frozen ones cost no weight gradients and no optimiser memory.

  A step whose loss or gradient norm is not finite leaves the parameters and
  optimiser state as they were and reports `train/nonfinite` = 1. `healthy`
  (a boolean carried from step to step) turns False then and stays False, so
  later steps change nothing either: a run stopped on it keeps its last good
  state. Pass `healthy` True each step to skip bad steps instead.
  """
  def loss_of(learn, frozen, scale, *args):
    # `frozen` comes in as it was made outside the gradient's trace; nnx's
    # scan (scan_layers) refuses Variables of another trace level, so copy
    # it into this one.
    frozen = jax.tree.map(lambda x: x, frozen)
    total, _ = token_losses(nnx.merge_state(learn, frozen), *args)
    return total * scale, total

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)
  tx = optax.with_extra_args_support(tx)  # takes the gradient norm (optim.clip_by_global_norm)

  def train_step(params, opt_state, step, healthy, batch):
    key = jax.random.fold_in(jax.random.key(seed), step)  # dropout: the same on resume
    learn, frozen = split_trained(params, trained)
    tokens = batch["loss_mask"].sum()
    scale = 1.0 / jnp.maximum(tokens, 1.0)
    if accum_steps == 1:
      (_, total), grads = grad_fn(learn, frozen, scale, graphdef, batch, key, label_smoothing,
                                 policy)
    else:
      def one(carry, xs):
        j, mb = xs
        (_, t), g = grad_fn(learn, frozen, scale, graphdef, mb, jax.random.fold_in(key, j),
                            label_smoothing, policy)
        acc_g, acc_t = carry
        return (jax.tree.map(jnp.add, acc_g, g), acc_t + t), None

      zeros = jax.tree.map(jnp.zeros_like, learn)
      (grads, total), _ = jax.lax.scan(
          one, (zeros, jnp.float32(0)),
          (jnp.arange(accum_steps), micro_batches(batch, accum_steps, batch_sharding)))
    loss = total * scale
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    apply = ok & healthy

    def update(state):
      learn, opt_state = state
      updates, new_opt = tx.update(grads, opt_state, learn, grad_norm=grad_norm)
      return optax.apply_updates(learn, updates), new_opt

    # A branch, not a select between old and new: the update then runs in
    # place in the donated buffers (a select made XLA copy the whole
    # optimiser state first).
    learn, new_opt = jax.lax.cond(apply, update, lambda state: state, (learn, opt_state))
    new_params = nnx.merge_state(learn, frozen)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/learning_rate": schedule(step), "train/tokens": tokens,
               "train/skipped_records": batch["skipped"].sum(),
               "train/nonfinite": (~ok).astype(jnp.int32)}
    return new_params, new_opt, step + 1, healthy & ok, metrics

  return train_step


@dataclasses.dataclass
class Setup:
  """A run's sharded train state and step, compiled for its mesh."""
  graphdef: Any
  abs_params: Any
  param_sh: Any
  abs_opt: Any
  opt_sh: Any
  init: Callable[[], tuple[Any, Any]]  # fresh (params, opt_state), created sharded
  init_opt: Callable[[Any], Any]  # params -> a fresh opt_state, created sharded
  train_step: Any  # jitted; donates params, opt_state and step


def _policy(t: ConfigDict) -> tuple[float, float, int] | None:
  """SCST's sampling distribution, where it is not the model's own."""
  if t.get("objective", "xent") != "scst":
    return None
  s = t.scst
  policy = (float(s.temperature), float(s.top_p), int(s.top_k))
  return None if policy == (1.0, 1.0, 0) else policy


def setup(cfg: ConfigDict, mesh: Mesh) -> Setup:
  """The model's abstract shapes first, then jitted initialisation straight
  into their shardings (no full copy on any host) and the jitted step with
  explicit in and out shardings."""
  from trainer import optim, params as params_lib, sharding
  from trainer.models.captioner import build_captioner

  graphdef, abs_params, param_sh = params_lib.abstract_model(cfg, mesh)
  tx = optim.optimizer(cfg.train)
  trained = optim.trained_filter(cfg, abs_params)
  init_opt = lambda params: tx.init(split_trained(params, trained)[0])
  abs_opt = jax.eval_shape(init_opt, abs_params)
  # Optimiser moments shard like their parameters; counts and the like replicate.
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt,
                                 split_trained(param_sh, trained)[0],
                                 transform_non_params=lambda _: sharding.replicated(mesh))

  def init():
    params = nnx.state(build_captioner(cfg.model, cfg.seed))
    return params, init_opt(params)

  step_sh = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)
  train_step = jax.jit(
      make_train_step(graphdef, tx, optim.schedule(cfg.train), cfg.seed, cfg.train.accum_steps,
                      cfg.train.label_smoothing, batch_sh, trained, _policy(cfg.train)),
      in_shardings=(param_sh, opt_sh, step_sh, step_sh, batch_sh),
      out_shardings=(param_sh, opt_sh, step_sh, step_sh, step_sh),
      donate_argnums=(0, 1, 2))
  return Setup(graphdef, abs_params, param_sh, abs_opt, opt_sh,
               jax.jit(init, out_shardings=(param_sh, opt_sh)),
               jax.jit(init_opt, out_shardings=opt_sh), train_step)


class StepRunner:
  """The jitted step with what it carries from call to call on the device
  (the step counter, the health flag), compiled ahead of its first call for
  XLA's FLOP count. `train.nonfinite=stop` carries the health flag, so that
  after a non-finite step no later one changes the state; `skip` passes True
  each step."""

  def __init__(self, setup: Setup, cfg: ConfigDict, mesh: Mesh, start: int):
    from trainer import sharding
    sh = sharding.replicated(mesh)
    self._jitted, self._compiled, self._devices = setup.train_step, None, mesh.size
    self._step = jax.device_put(jnp.int32(start), sh)
    self._always = jax.device_put(jnp.bool_(True), sh)
    self._healthy = self._always
    self._carry_health = cfg.train.nonfinite == "stop"
    self.flops: float | None = None  # one device's share of one step, once compiled

  def __call__(self, params, opt_state, batch):
    """(params, opt_state, metrics) after one step."""
    from trainer import flops as flops_lib, host_memory
    first = self._compiled is None
    carry = self._healthy if self._carry_health else self._always
    if first:
      lowered = self._jitted.lower(params, opt_state, self._step, carry, batch)
      self._compiled = lowered.compile()
      self.flops = flops_lib.step_flops(lowered, self._devices)
    params, opt_state, self._step, self._healthy, metrics = self._compiled(
        params, opt_state, self._step, carry, batch)
    if first:  # the step's scratch memory, kept for the next (CPU)
      jax.block_until_ready(metrics)
      host_memory.keep_freed_memory()
    return params, opt_state, metrics
