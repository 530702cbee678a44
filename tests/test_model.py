import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer import generate
from trainer.models.captioner import Captioner
from trainer.models.gpt2 import GPT2Config
from trainer.models.vit import ViTConfig


# A model's forward pass, compiled once per model and input shapes: eager
# dispatch of its every operation is what would take the time here.
_forward = nnx.jit(lambda model, *args: model(*args))


def _model(enc_dim=32, dec_dim=48):
  enc = ViTConfig(hidden_size=enc_dim, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, image_size=32, patch_size=8)
  dec = GPT2Config(vocab_size=50, n_positions=16, n_embd=dec_dim, n_layer=2, n_head=4)
  return Captioner(enc, dec, (0.5,) * 3, (0.5,) * 3, nnx.Rngs(0))


def test_grouped_captions_equal_repeated_images():
  """G captions per image share one encoder pass; the result is the same as
  repeating each image G times."""
  m = _model()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
  ids = jnp.asarray(rng.integers(0, 50, (2, 3, 7)), jnp.int32)
  grouped = _forward(m, images, ids)
  repeated = _forward(m, jnp.repeat(images, 3, axis=0), ids.reshape(6, 1, 7))
  repeated = repeated.reshape(2, 3, 7, 50)
  np.testing.assert_allclose(grouped, repeated, atol=1e-5)
  assert m.enc_to_dec_proj is not None  # 32 -> 48


@pytest.mark.parametrize("side", [32, 37])  # 37: a remainder the convolution drops
def test_patch_embedding_equals_the_convolution(side):
  vit = _model().encoder
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, side, side, 3)), jnp.float32)
  np.testing.assert_allclose(vit._embed_patches(x), vit.patch_embed(x), atol=1e-5)
  assert vit._embed_patches(x).shape == (2, 4, 4, 32)


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_gradient_equals_autodiff(approximate, dtype):
  from trainer.models import layers

  x = jnp.linspace(-8, 8, 4001).astype(dtype)
  ours = jax.vmap(jax.grad(lambda v: layers.gelu(v, approximate)))(x)
  # Against float32 autodiff: in bfloat16 autodiff itself is off by up to 0.016
  # (cancellation in its tanh terms); this gradient computes in float32.
  auto = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=approximate)))(
      x.astype(jnp.float32))
  assert ours.dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 4e-3
  np.testing.assert_allclose(np.float32(ours), auto, atol=tol, rtol=tol)
  np.testing.assert_array_equal(layers.gelu(x, approximate),
                                jax.nn.gelu(x, approximate=approximate))


def _textbook_attention(q, k, v, mask, rate, key):
  """softmax(q k^T / sqrt(d)) v with dropout, per query group, left to autodiff."""
  n, lq, h, d = q.shape
  b = k.shape[0]
  qg = q.reshape(b, n // b, lq, h, d)
  s = jnp.einsum("bgqhd,bhkd->bghqk", qg, k).astype(jnp.float32) / np.sqrt(d)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  if rate:  # the mask attend draws: [B, H, G * Lq, Lk]
    keep = jax.random.bernoulli(key, 1 - rate, (b, h, n // b * lq, k.shape[2]))
    keep = keep.reshape(b, h, n // b, lq, -1).transpose(0, 2, 1, 3, 4)
    p = jnp.where(keep, p / (1 - rate), 0)
  out = jnp.einsum("bghqk,bhkd->bgqhd", p.astype(v.dtype), v)
  return out.reshape(n, lq, h * d)


@pytest.mark.parametrize("groups,causal,rate,dtype", [
    (2, False, 0.0, jnp.float32), (1, True, 0.3, jnp.float32), (3, True, 0.2, jnp.float32),
    (2, False, 0.2, jnp.bfloat16)])
def test_attention_gradient_equals_autodiff(groups, causal, rate, dtype):
  """attend's written-out backward pass against autodiff of the textbook
  formula: shared keys per query group, causal mask, dropout."""
  from trainer.models import attention

  rng = np.random.default_rng(0)
  b, lq, lk, h, d = 2, 5, 5 if causal else 9, 3, 8
  q = jnp.asarray(rng.normal(size=(b * groups, lq, h, d)), dtype)
  k, v = (jnp.asarray(rng.normal(size=(b, h, lk, d)), dtype) for _ in range(2))
  w = jnp.asarray(rng.normal(size=(b * groups, lq, h * d)), jnp.float32)
  mask = jnp.tril(jnp.ones((lq, lk), bool)) if causal else None
  key = jax.random.key(3)

  def value_and_grads(attention):
    loss = lambda q, k, v: (attention(q, k, v, mask, rate, key).astype(jnp.float32) * w).sum()
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  ours = lambda q, k, v, mask, rate, key: attention.attend(q, k, v, 0 if causal else None,
                                                          rate, key)
  (ours, ours_g), (want, want_g) = value_and_grads(ours), value_and_grads(_textbook_attention)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(ours, want, rtol=tol)
  for a, b_ in zip(ours_g, want_g):
    assert a.dtype == dtype
    np.testing.assert_allclose(np.float32(a), np.float32(b_), rtol=tol, atol=tol)
    assert float(jnp.abs(np.float32(a)).max()) > 0.1  # gradients that say something


@pytest.mark.parametrize("groups,lq,lk,causal_from,dtype", [
    (3, 5, 9, None, jnp.float32),  # cross-attention: captions sharing an image's keys
    (1, 6, 6, 0, jnp.float32),  # training's causal self-attention
    (1, 1, 8, 4, jnp.float32),  # a decoding step over the cache
    (1, 3, 8, 2, jnp.float32),  # several queries over the cache
    (1, 6, 6, 0, jnp.bfloat16)])
@pytest.mark.parametrize("backend", ["dot_product", "splash"])
def test_attention_backends_compute_the_same(groups, lq, lk, causal_from, dtype, backend):
  """"dot_product" (jax.nn.dot_product_attention, XLA's on this CPU),
  "splash" (the TPU kernel, in Pallas' interpreter here; decoding steps
  fall back) and "xla": the same outputs and gradients for every mask
  attend takes."""
  from trainer.models import attention

  rng = np.random.default_rng(1)
  b, h, d = 2, 4, 8
  q = jnp.asarray(rng.normal(size=(b * groups, lq, h, d)), dtype)
  k, v = (jnp.asarray(rng.normal(size=(b, h, lk, d)), dtype) for _ in range(2))
  w = jnp.asarray(rng.normal(size=(b * groups, lq, h * d)), jnp.float32)

  def value_and_grads(backend):
    loss = lambda q, k, v: (attention.attend(q, k, v, causal_from, backend=backend)
                            .astype(jnp.float32) * w).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  (a, a_g), (b_, b_g) = value_and_grads("xla"), value_and_grads(backend)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(float(a), float(b_), rtol=tol)
  for x, y in zip(a_g, b_g):
    np.testing.assert_allclose(np.float32(x), np.float32(y), rtol=tol, atol=tol)
  if causal_from is not None:  # the keys a query may not see get no gradient
    last_seen = causal_from + lq - 1
    assert not np.asarray(a_g[1][:, :, last_seen + 1:]).any()
  with pytest.raises(ValueError, match="model.attention: unknown 'flash'"):
    attention.resolve("flash")
  assert attention.resolve("splash") == "splash"
  assert attention.resolve("auto", "gpu") == "dot_product"
  assert attention.resolve("auto", "cpu") == attention.resolve("auto", "tpu") == "xla"


def test_a_captioner_decodes_the_same_with_every_backend():
  """The whole model with "dot_product" and "splash" attention: the logits of
  "xla", and the same greedy and beam-search captions (its decoding masks
  included)."""
  enc = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, image_size=32, patch_size=8)
  dec = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)
  models = [Captioner(enc, dec, (0.5,) * 3, (0.5,) * 3, nnx.Rngs(0), attention=a)
            for a in ("xla", "dot_product", "splash")]
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (3, 32, 32, 3)), jnp.uint8)
  ids = jnp.asarray(rng.integers(0, 50, (3, 2, 7)), jnp.int32)
  logits = [nnx.jit(lambda m: m(images, ids))(m) for m in models]
  for other in logits[1:]:
    np.testing.assert_allclose(logits[0], other, rtol=1e-5, atol=1e-5)
  for fn in (lambda m: generate.greedy(m, images, 8, 0, 3, 0),
             lambda m: generate.beam_search(m, images, 8, 3, 0, 3, 0)):
    want = fn(models[0])
    for m in models[1:]:
      np.testing.assert_array_equal(fn(m), want)


@pytest.mark.parametrize("beams", [1, 3])
def test_decoding_reports_its_captions_log_probability(beams):
  """The log-probability greedy and beam search report for their caption is
  the sum a teacher-forced pass over it gives, up to and including EOS."""
  m = _model()
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
  bos, pad = 0, 1
  # No token twice (this random model would repeat one), EOS a token some
  # captions reach early: the sums count up to EOS, the banned tokens'
  # probability mass included as the model gives it.
  eos = int(generate.greedy(m, images, 8, bos, -1, pad, 1)[0, 3])
  if beams == 1:
    ids, total = generate.greedy(m, images, 8, bos, eos, pad, 1, with_logprob=True)
  else:
    ids, total = generate.beam_search(m, images, 8, beams, bos, eos, pad, 1.0, False, 1,
                                      with_logprob=True)
  ids = np.asarray(ids)
  assert (ids == eos).any() and not (ids == eos).all(axis=1).any()  # ends both ways
  inputs = np.concatenate([np.full((4, 1), bos), ids[:, :-1]], axis=1)
  logp = jax.nn.log_softmax(_forward(m, images, jnp.asarray(inputs)[:, None])[:, 0], -1)
  picked = np.take_along_axis(np.asarray(logp), ids[..., None], -1)[..., 0]
  ended = np.cumsum(ids == eos, axis=1) - (ids == eos)  # EOSes before each position
  want = np.where(ended == 0, picked, 0.0).sum(axis=1)
  np.testing.assert_allclose(np.asarray(total), want, rtol=1e-4, atol=1e-4)


def test_sampling_draws_within_top_p():
  """Sampling with a top-p too small to hold more than the likeliest token is
  greedy decoding; at top-p 1 and a high temperature, rows with other keys
  draw other captions."""
  m = _model()
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
  keys = jax.vmap(jax.random.key)(jnp.arange(4))
  greedy = generate.greedy(m, images, 8, 0, 3, 1)
  narrow = generate.greedy(m, images, 8, 0, 3, 1, sampling=generate.Sampling(keys, 1.0, 1e-6))
  np.testing.assert_array_equal(narrow, greedy)
  wide = generate.greedy(m, jnp.repeat(images[:1], 4, 0), 8, 0, 3, 1,
                         sampling=generate.Sampling(keys, 5.0, 1.0))
  assert len({tuple(r) for r in np.asarray(wide).tolist()}) > 1


@pytest.mark.parametrize("vocab", [384, 1000])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_top_k_and_kth_largest_equal_lax_top_k(vocab, k):
  """Values on a grid (ties within and across the candidate blocks) and
  masked tokens (-inf, fewer finite than k in the last row)."""
  rng = np.random.default_rng(k)
  x = np.round(rng.normal(size=(6, vocab)) * 4) / 4
  x[0, ::2] = -np.inf
  x[-1, k // 2:] = -np.inf
  x = jnp.asarray(x, jnp.float32)
  values, index = jax.lax.top_k(x, k)
  got_values, got_index = generate.top_k(x, k)
  np.testing.assert_array_equal(got_values, values)
  np.testing.assert_array_equal(got_index, index)
  np.testing.assert_array_equal(jax.jit(generate.kth_largest, static_argnums=1)(x, k),
                                values[:, -1:])


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_nucleus_floor_equals_a_sorted_cumulative_sum(top_p):
  """The last logit inside the nucleus, against numpy in float64: ties, a
  masked token, one token holding it all; rows whose boundary lies within
  rounding of top_p are not compared."""
  rng = np.random.default_rng(int(top_p * 1000))
  x = np.round(rng.normal(size=(64, 384)) * rng.uniform(0.5, 8, (64, 1)) * 4) / 4
  x[0, 5] = -np.inf
  x[1, 7] = 100.0
  got = np.asarray(jax.jit(generate.nucleus_floor, static_argnums=1)(jnp.asarray(x, jnp.float32),
                                                                     top_p))[:, 0]
  compared = 0
  for row, floor in zip(x, got):
    order = np.sort(row)[::-1]
    p = np.exp(order - order[0])
    p /= p.sum()
    before = np.cumsum(p) - p
    if np.min(np.abs(before - top_p)) < 2e-6:
      continue
    assert floor == order[before < top_p].min()
    compared += 1
  assert compared >= 56


def test_cached_greedy_equals_full_recompute():
  m = _model()
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.integers(0, 256, (3, 32, 32, 3)), jnp.uint8)
  out = generate.greedy(m, images, max_length=10, bos=0, eos=-1, pad=0)  # eos never hit
  # No cache: the whole sequence again at each step (one compiled length;
  # the tokens not yet chosen, zeros, lie after the position read).
  graphdef, state = nnx.split(m)
  full = jax.jit(lambda state, seq: nnx.merge(graphdef, state)(images, seq[:, None, :])[:, 0])
  seq = jnp.zeros((3, 11), jnp.int32)
  for t in range(10):
    seq = seq.at[:, t + 1].set(jnp.argmax(full(state, seq)[:, t], -1).astype(jnp.int32))
  np.testing.assert_array_equal(out, seq[:, 1:])


def test_greedy_pads_after_eos_and_stops():
  m = _model()
  images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
  first = generate.greedy(m, images, max_length=6, bos=0, eos=-1, pad=0)
  eos = int(first[0, 1])  # make the second generated token the end
  out = np.asarray(generate.greedy(m, images, max_length=6, bos=0, eos=eos, pad=7))
  row = out[0].tolist()
  cut = row.index(eos)
  assert cut <= 1 and all(t == 7 for t in row[cut + 1:])


def test_parameters_carry_logical_axis_names():
  m = _model()
  specs = nnx.get_partition_spec(nnx.state(m))
  flat = {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
  assert len(flat) == len(jax.tree.leaves(nnx.state(m)))
  named = {k: tuple(v) for k, v in flat.items()}
  assert any(v == ("vocab", "embed") for v in named.values())
  assert any(v == ("embed", "heads") for v in named.values())
  assert any(v == ("embed", "mlp") for v in named.values())


def _grads(remat, dtype=jnp.float32):
  enc = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, image_size=32, patch_size=8)
  dec = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)
  m = Captioner(enc, dec, (0.5,) * 3, (0.5,) * 3, nnx.Rngs(0), dtype=dtype, remat=remat)
  graphdef, params = nnx.split(m)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
  ids = jnp.asarray(rng.integers(0, 50, (2, 2, 6)), jnp.int32)

  def loss(p):
    logits = nnx.merge(graphdef, p)(images, ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_keeps_loss_and_gradients():
  base_loss, base = _grads("none")
  for remat in ("full", "dots"):
    loss, grads = _grads(remat)
    assert float(loss) == float(base_loss)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_parameters():
  loss32, _ = _grads("none")
  loss16, grads = _grads("none", jnp.bfloat16)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert abs(float(loss16) - float(loss32)) < 0.05 * abs(float(loss32))


def _twins(dropout=0.0, remat="none"):
  """The same weights in both layer layouts: a list of layers, and stacked
  layers run by a scan (rematerialised as asked)."""
  from trainer.params import to_layout

  enc = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                  intermediate_size=64, image_size=32, patch_size=8,
                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
  dec = GPT2Config(vocab_size=50, n_positions=16, n_embd=48, n_layer=2, n_head=4,
                   resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
  listed = Captioner(enc, dec, (0.5,) * 3, (0.5,) * 3, nnx.Rngs(0))
  scanned = Captioner(enc, dec, (0.5,) * 3, (0.5,) * 3, nnx.Rngs(1), scan=True, remat=remat)
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, to_layout(nnx.to_pure_dict(nnx.state(listed, nnx.Param)), True))
  nnx.update(scanned, state)
  return listed, scanned


def _loss_and_grads(model, images, ids, key=None):
  graphdef, params = nnx.split(model)

  def loss(p):
    logits = nnx.merge(graphdef, p)(images, ids, key)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_scanned_layers_compute_the_same(remat):
  from trainer.params import to_layout

  listed, scanned = _twins(remat=remat)
  specs = nnx.get_partition_spec(nnx.state(scanned))
  assert tuple(specs["decoder"]["h"]["attn"]["query"]["kernel"]) == ("layers", "embed", "heads")
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
  ids = jnp.asarray(rng.integers(0, 50, (2, 2, 6)), jnp.int32)
  loss_a, grads_a = _loss_and_grads(listed, images, ids)
  loss_b, grads_b = _loss_and_grads(scanned, images, ids)
  assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-6)
  grads_b = to_layout(nnx.to_pure_dict(grads_b), False)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(grads_a)), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for fn in (lambda m: generate.greedy(m, images, 8, 0, 3, 0),
             lambda m: generate.beam_search(m, images, 8, 3, 0, 3, 0)):
    np.testing.assert_array_equal(fn(listed), fn(scanned))
  back = to_layout(to_layout(nnx.to_pure_dict(nnx.state(listed, nnx.Param)), True), False)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(listed, nnx.Param))),
                  jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_dropout_only_with_a_key():
  listed, scanned = _twins(dropout=0.2)
  plain, _ = _twins(dropout=0.0)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
  ids = jnp.asarray(rng.integers(0, 50, (2, 2, 6)), jnp.int32)
  key = jax.random.key(7)
  evaluated = _forward(listed, images, ids)
  np.testing.assert_array_equal(evaluated, _forward(plain, images, ids))  # no key: no dropout
  a, b = _forward(listed, images, ids, key), _forward(listed, images, ids, key)
  np.testing.assert_array_equal(a, b)  # the key decides
  assert float(jnp.abs(a - evaluated).max()) > 1e-2
  assert float(jnp.abs(_forward(listed, images, ids, jax.random.key(8)) - a).max()) > 1e-2
  np.testing.assert_allclose(_forward(scanned, images, ids, key), a, rtol=1e-5, atol=1e-5)
  loss, grads = _loss_and_grads(scanned, images, ids, key)
  assert np.isfinite(float(loss)) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_dropout_rate_and_scale():
  from trainer.models.layers import dropout

  x = jnp.ones((200, 500))
  y = np.asarray(dropout(x, 0.3, jax.random.key(0)))
  assert abs((y == 0).mean() - 0.3) < 0.01
  np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)
  assert dropout(x, 0.3, None) is x
