"""The train step: accumulation, label smoothing, non-finite steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from trainer import optim, step as step_lib
from trainer.models.captioner import Captioner
from trainer.models.gpt2 import GPT2Config
from trainer.models.vit import ViTConfig


def _model_and_batch(batch=8, k=2, length=7, seed=0):
  enc = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, image_size=16, patch_size=8)
  dec = GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # masks differ per micro-batch
  graphdef, params = nnx.split(Captioner(enc, dec, (0.5,) * 3, (0.5,) * 3, nnx.Rngs(seed)))
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 40, (batch, k, length + 1))
  lengths = rng.integers(1, length + 1, (batch, k))  # padding differs from row to row
  mask = (np.arange(length)[None, None] < lengths[..., None]).astype(np.float32)
  data = {"image": jnp.asarray(rng.integers(0, 256, (batch, 16, 16, 3)), jnp.uint8),
          "input_ids": jnp.asarray(ids[..., :-1], jnp.int32),
          "labels": jnp.asarray(ids[..., 1:], jnp.int32),
          "loss_mask": jnp.asarray(mask), "skipped": jnp.zeros((batch,), jnp.int32)}
  return graphdef, params, data


def _step(graphdef, params, accum=1, smoothing=0.0, tx=None):
  tx = tx or optax.adamw(1e-2)
  fn = jax.jit(step_lib.make_train_step(graphdef, tx, optax.constant_schedule(1e-2),
                                        accum_steps=accum, label_smoothing=smoothing))
  return fn, tx.init(params)


def test_accumulated_micro_batches_equal_one_big_batch():
  """4 micro-batches of 4 = one batch of 16, padding unequal between them."""
  graphdef, params, batch = _model_and_batch(batch=16)
  ok = jnp.bool_(True)
  outs = []
  for accum in (1, 4):
    fn, opt = _step(graphdef, params, accum, tx=optax.sgd(1.0))  # parameters - gradients
    outs.append(fn(params, opt, jnp.int32(0), ok, batch))
  (p1, _, _, _, m1), (p4, _, _, _, m4) = outs
  for key in ("train/loss", "train/grad_norm", "train/tokens"):
    np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_clipping_by_the_steps_norm_equals_optax(max_norm):
  """optim.clip_by_global_norm (from the norm the step computed) against
  optax.clip_by_global_norm, clipping (1e-3) and not (1e3), under SGD, where
  the clip shows in the parameters."""
  graphdef, params, batch = _model_and_batch()
  outs = []
  for clip in (optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)):
    fn, opt = _step(graphdef, params, tx=optax.chain(clip, optax.sgd(1.0)))
    outs.append(fn(params, opt, jnp.int32(0), jnp.bool_(True), batch))
  (ours, _, _, _, m), (ref, _, _, _, _) = outs
  assert (float(m["train/grad_norm"]) > max_norm) == (max_norm < 1)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  moved = max(float(jnp.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(ours), jax.tree.leaves(params)))
  assert (moved < 2e-3) == (max_norm < 1), moved  # a clipped step moves at most max_norm


def test_micro_batches_take_every_kth_row():
  x = {"a": jnp.arange(8)}
  np.testing.assert_array_equal(step_lib.micro_batches(x, 2)["a"], [[0, 2, 4, 6], [1, 3, 5, 7]])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_matches_pytorch_cross_entropy(smoothing):
  graphdef, params, batch = _model_and_batch()
  loss, tokens = step_lib.loss_fn(params, graphdef, batch, label_smoothing=smoothing)
  logits = np.asarray(nnx.merge(graphdef, params)(batch["image"], batch["input_ids"]))
  mask = np.asarray(batch["loss_mask"]) > 0
  want = torch.nn.functional.cross_entropy(
      torch.from_numpy(logits[mask]), torch.from_numpy(np.asarray(batch["labels"])[mask]).long(),
      label_smoothing=smoothing)
  assert float(loss) == pytest.approx(want.item(), rel=1e-5)
  assert float(tokens) == mask.sum()


def test_non_finite_steps_change_nothing():
  graphdef, params, batch = _model_and_batch()
  fn, opt = _step(graphdef, params)
  bad = {**batch, "loss_mask": batch["loss_mask"].at[0, 0, 0].set(jnp.nan)}
  same = lambda a, b: all(np.array_equal(x, y) for x, y in
                          zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  p, o, s, healthy, m = fn(params, opt, jnp.int32(0), jnp.bool_(True), bad)
  assert int(m["train/nonfinite"]) == 1 and not bool(healthy) and int(s) == 1
  assert same(p, params) and same(o, opt)
  # train.nonfinite=stop carries healthy=False: later good steps change nothing.
  p2, _, _, healthy, m = fn(p, o, s, healthy, batch)
  assert int(m["train/nonfinite"]) == 0 and not bool(healthy) and same(p2, params)
  # train.nonfinite=skip passes healthy=True: the good step applies.
  p3, _, _, healthy, _ = fn(p, o, s, jnp.bool_(True), batch)
  assert bool(healthy) and not same(p3, params)


def test_a_bfloat16_first_moment_trains_as_float32_does():
  """train.mu_dtype "bfloat16": Adam's first moment in bfloat16, the second
  and the parameters float32, and the same losses within bfloat16's error."""
  from trainer import config as config_lib
  graphdef, params, batch = _model_and_batch()
  losses = {}
  for mu_dtype in ("float32", "bfloat16"):
    train = config_lib.load("demo").train
    train.update(mu_dtype=mu_dtype, steps=6, warmup_steps=1, learning_rate=1e-2)
    fn, opt = _step(graphdef, params, tx=optim.optimizer(train))
    p, ok, out = params, jnp.bool_(True), []
    for i in range(6):
      p, opt, _, _, metrics = fn(p, opt, jnp.int32(i), ok, batch)
      out.append(float(metrics["train/loss"]))
    losses[mu_dtype] = out
    adam = opt[1][0]
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(mu_dtype)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}
  assert losses["float32"][-1] < losses["float32"][0] - 0.1
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=1e-2)
  bad = config_lib.load("demo").train
  bad.mu_dtype = "float16"
  with pytest.raises(ValueError, match="train.mu_dtype: unknown 'float16'"):
    optim.optimizer(bad)


@pytest.mark.parametrize("policy", [(1.0, 1.0, 0), (0.7, 1.0, 3), (1.0, 0.8, 0), (1.3, 0.9, 5)])
def test_scst_loss_is_the_sampling_distributions_log_probability(policy):
  """With an advantage per caption (SCST), each sampled token's loss is
  -A log q, q the distribution samples are drawn from: softmax(logits / T)
  cut to the top k and to the top-p mass, renormalised (numpy here, sorting
  each row). Tokens outside it (the padding after EOS, a sample rounding put
  at the cut) count as the temperature's softmax within the cut plus
  themselves, and no gradient is non-finite. Captions not sampled (the
  references of train.scst.xent_weight) keep the model's softmax."""
  t, top_p, k = policy
  graphdef, params, batch = _model_and_batch()
  rng = np.random.default_rng(1)
  adv = rng.normal(size=batch["labels"].shape[:2]).astype(np.float32)
  sampled = np.ones(adv.shape, np.float32)
  sampled[::3, 1] = 0  # some captions are references
  batch = {**batch, "advantage": jnp.asarray(adv), "sampled": jnp.asarray(sampled)}
  loss, tokens = step_lib.loss_fn(params, graphdef, batch, policy=policy)
  logits = np.asarray(nnx.merge(graphdef, params)(batch["image"], batch["input_ids"]),
                      np.float64) / t
  labels, mask = np.asarray(batch["labels"]), np.asarray(batch["loss_mask"])
  want = 0.0
  for idx in np.ndindex(*labels.shape):
    x = logits[idx] if sampled[idx[:2]] else logits[idx] * t  # a reference: the softmax
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(x.shape, bool)
    order = order[:k or len(x)]  # top-p within the top k, as transformers filters
    p = np.exp(x[order] - x.max())
    p /= p.sum()
    keep[order[np.cumsum(p) - p < top_p]] = True
    keep[labels[idx]] = True
    keep |= not sampled[idx[:2]]
    lse = np.log(np.exp(x[keep] - x.max()).sum()) + x.max()
    want += mask[idx] * adv[idx[:2]] * (lse - x[labels[idx]])
  assert float(loss) == pytest.approx(want / mask.sum(), rel=1e-5)
  grads = jax.grad(lambda p: step_lib.loss_fn(p, graphdef, batch, policy=policy)[0])(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
