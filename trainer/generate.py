"""Caption generation: greedy decoding and beam search, with a preallocated
KV cache.

The encoder and the cross-attention keys run once per image (beams share
them); each decode is one `lax.while_loop` that stops as soon as no sequence
can change any more.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainer.models.captioner import Captioner


def banned_tokens(seqs: jax.Array, length: jax.Array, n: int, vocab: int) -> jax.Array:
  """[R, V] True for the tokens that would repeat an n-gram of `seqs[:, :length]`
  (start token included), as transformers' `no_repeat_ngram_size` bans them."""
  r, total = seqs.shape
  banned = jnp.zeros((r, vocab), bool)
  if n <= 0 or total < n:
    return banned
  tail = jax.lax.dynamic_slice_in_dim(seqs, jnp.maximum(length - (n - 1), 0), n - 1, axis=1)
  rows = jnp.arange(r)
  for start in range(total - n + 1):  # every n-gram of the prefix, at fixed positions
    match = jnp.all(seqs[:, start:start + n - 1] == tail, axis=1) & (start + n <= length)
    banned = banned.at[rows, seqs[:, start + n - 1]].max(match)
  return banned


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Tokens drawn instead of the most likely: from the softmax at
  `temperature`, within the smallest set of tokens whose probability
  reaches `top_p` (and the `top_k` most likely, if set); row r draws with
  `keys[r]`, folded with the position."""
  keys: jax.Array  # [B] typed PRNG keys
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0  # > 0: only the k most likely tokens

  def draw(self, logits: jax.Array, step: jax.Array) -> jax.Array:
    x = truncate(logits, self.temperature, self.top_p, self.top_k)
    keys = jax.vmap(jax.random.fold_in, (0, None))(self.keys, step)
    return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)


def truncate(logits: jax.Array, temperature: float = 1.0, top_p: float = 1.0,
             k: int = 0) -> jax.Array:
  """[R, V] logits of the distribution `Sampling` draws from: divided by
  the temperature, -inf outside the `k` most likely tokens (k > 0) and
  outside the smallest set whose probability reaches `top_p`."""
  x = logits.astype(jnp.float32) / temperature
  if k:
    kth = jax.lax.stop_gradient(kth_largest(x, k))
    x = jnp.where(x >= kth, x, -jnp.inf)
  if top_p < 1.0:
    x = jnp.where(x >= jax.lax.stop_gradient(nucleus_floor(x, top_p)), x, -jnp.inf)
  return x


def nucleus_floor(x: jax.Array, top_p: float) -> jax.Array:
  """[R, 1]: the smallest logit of each row of [R, V] whose likelier tokens
  hold less than `top_p` of the probability, the last one inside the
  nucleus. Found without sorting (XLA:CPU sorts slowly; this is about 15x
  faster over 384 tokens): logits map to int32 keys in the same order, and
  32 halvings of the key range find the smallest key whose strictly larger
  logits' mass is below top_p, which is always some logit's own."""
  p = jax.nn.softmax(x, axis=-1)
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  key = bits ^ ((bits >> 31) & 0x7fffffff)  # its own inverse

  def halve(_, bounds):
    lo, hi = bounds  # the answer lies in [lo, hi]
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # no overflow
    inside = jnp.sum(jnp.where(key > mid, p, 0.0), axis=-1, keepdims=True) < top_p
    return jnp.where(inside, lo, mid + 1), jnp.where(inside, mid, hi)

  bounds = (jnp.min(key, axis=-1, keepdims=True), jnp.max(key, axis=-1, keepdims=True))
  found = jax.lax.fori_loop(0, 32, halve, bounds)[1]
  return jax.lax.bitcast_convert_type(found ^ ((found >> 31) & 0x7fffffff), x.dtype)


Start = int | tuple[int, ...]


def _start(bos) -> tuple[int, ...]:
  """The tokens every caption starts from: BOS, then a prompt's (forced)."""
  return (int(bos),) if isinstance(bos, (int, np.integer)) else tuple(int(t) for t in bos)


def _prefill(decode, start: tuple[int, ...], cross, cache, rows: int):
  """The cache with every start token but the last written in: the loop's
  first step feeds the last one."""
  if len(start) == 1:
    return cache
  ids = jnp.broadcast_to(jnp.asarray(start[:-1], jnp.int32), (rows, len(start) - 1))
  return decode(ids, cross, cache, 0)[1]


def greedy(model: Captioner, images: jax.Array, max_length: int, bos: Start, eos: int,
           pad: int, no_repeat_ngram_size: int = 0, with_logprob: bool = False,
           sampling: Sampling | None = None, per_image: int = 1):
  """images [B, H, W, C] uint8 -> token ids [B, max_length], padded after EOS
  (with `with_logprob`, and the sum of their log-probabilities [B]); the most
  likely token each step, or with `sampling` a drawn one. `bos`: the start
  token, or a tuple of it and a prompt's tokens, which the captions continue
  (and do not include). `per_image` N: N captions an image, [B * N, ...],
  image b's rows b * N .. b * N + N - 1, behind one encoder pass."""
  b = images.shape[0] * per_image
  start = _start(bos)
  s0 = len(start)
  cross = model.cross_kv(images)
  decode = _pure_decoder(model)
  cache = _prefill(decode, start, cross, model.decoder.init_cache(b, max_length + s0 - 1), b)
  head = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (b, s0))
  tokens = jnp.full((b, max_length), pad, jnp.int32)
  state = (jnp.int32(0), head[:, -1], tokens,
           jnp.zeros((b,), bool), cache, jnp.zeros((b,), jnp.float32))

  def cond(s):
    i, _, _, done, _, _ = s
    return (i < max_length) & ~jnp.all(done)

  def body(s):
    i, last, tokens, done, cache, total = s
    logits, cache = decode(last[:, None], cross, cache, i + s0 - 1)
    logits = logits[:, -1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32)) if with_logprob else None
    if no_repeat_ngram_size:
      seqs = jnp.concatenate([head, tokens], axis=1)
      ban = banned_tokens(seqs, i + s0, no_repeat_ngram_size, logits.shape[-1])
      logits = jnp.where(ban, -jnp.inf, logits)
    nxt = top_k(logits, 1)[1][:, 0] if sampling is None else sampling.draw(logits, i)
    if with_logprob:
      chosen = jnp.take_along_axis(logp, nxt[:, None], axis=1)[:, 0]
      total = total + jnp.where(done, 0.0, chosen)
    nxt = jnp.where(done, pad, nxt)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i, 1)
    return i + 1, nxt, tokens, done | (nxt == eos), cache, total

  out = jax.lax.while_loop(cond, body, state)
  return (out[2], out[5]) if with_logprob else out[2]


def _pure_decoder(model: Captioner):
  """The decoder step as a function of arrays alone: the loop bodies rebuild
  the module inside their own trace, as NNX requires of layer scans."""
  graphdef, state = nnx.split(model.decoder)

  def decode(ids, cross, cache, index):
    fresh = jax.tree.map(lambda x: x, state)  # Variables of this trace
    return nnx.merge(graphdef, fresh)(ids, cross, cache, index)

  return decode


def _candidate_blocks(x: jax.Array, k: int, block: int) -> tuple[jax.Array, jax.Array]:
  """The top k entries of each row of [R, V] lie in the k blocks with the
  largest maxima: those blocks' entries in index order, then the ragged
  tail, [R, k * block + V % block], and the blocks' indices [R, k]."""
  r, v = x.shape
  nb = v // block
  main = x[:, :nb * block].reshape(r, nb, block)
  _, blocks = jax.lax.top_k(jnp.max(main, axis=-1), k)
  blocks = jnp.sort(blocks, axis=-1)  # candidates in index order: ties as top_k breaks them
  cand = jnp.take_along_axis(main, blocks[:, :, None], axis=1).reshape(r, k * block)
  return jnp.concatenate([cand, x[:, nb * block:]], axis=1), blocks


def top_k(x: jax.Array, k: int, block: int = 128) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k` over the last axis of [R, V], the same values and
  indices (ties to the lower index), about 3x faster on the CPU for a large
  vocabulary: only the candidate blocks (and the ragged tail) are ranked."""
  nb = x.shape[1] // block
  if nb <= k:
    return jax.lax.top_k(x, k)
  cand, blocks = _candidate_blocks(x, k, block)
  values, pos = jax.lax.top_k(cand, k)
  in_block = jnp.take_along_axis(blocks, jnp.minimum(pos // block, k - 1), axis=1) * block
  index = jnp.where(pos < k * block, in_block + pos % block, nb * block + pos - k * block)
  return values, index.astype(jnp.int32)


def kth_largest(x: jax.Array, k: int, block: int = 128) -> jax.Array:
  """[R, 1]: `top_k(x, k)[0][:, -1:]`, the k-th largest entry of each row
  (ties counted), without ranking: k passes of max over the candidates, each
  taking out every entry equal to its maximum. XLA:CPU's top_k sorts the
  whole row; this is about 35x faster for k = 3 over 384 tokens."""
  if x.shape[1] // block > k:
    x = _candidate_blocks(x, k, block)[0]
  found = jnp.zeros((x.shape[0], 1), jnp.int32)
  kth = jnp.full((x.shape[0], 1), -jnp.inf, x.dtype)
  for _ in range(k):
    m = jnp.max(x, axis=-1, keepdims=True)
    kth = jnp.where(found < k, m, kth)
    found = found + jnp.sum(x == m, axis=-1, keepdims=True, dtype=jnp.int32)
    x = jnp.where(x == m, -jnp.inf, x)
  return kth


def make_generate_fn(graphdef: nnx.GraphDef, eval_cfg, bos: Start, eos: int, pad: int,
                     param_shardings=None, batch_sharding=None, with_logprob: bool = False,
                     sampling: tuple[int, float, float] | None = None, num_return: int = 0):
  """A jitted (params, images) -> token ids (and with `with_logprob` the sum
  of their log-probabilities), sharded over the batch axes: greedy when
  `eval_cfg.num_beams` is 1, beam search otherwise. `sampling` (seed,
  temperature, top_p): (params, images, row seeds [B] uint32) drawing each
  row's tokens with a key of `seed` and its own row seed. `num_return` N > 0:
  [B, N, L] (and [B, N]), the N best beams, or N draws per image (draw n
  with its key folded with n)."""
  if num_return and sampling is None and num_return > eval_cfg.num_beams:
    raise ValueError(f"--num-return {num_return}: at most --num-beams "
                     f"({eval_cfg.num_beams}) without --sample")
  stopping = {"true": True, "false": False, "never": "never"}.get(
      str(eval_cfg.early_stopping).lower())
  if stopping is None:
    raise ValueError(f"eval.early_stopping: {eval_cfg.early_stopping!r} is not true, false "
                     "or never")

  if sampling is not None and (sampling[1] <= 0 or not 0 < sampling[2] <= 1):
    raise ValueError(f"--temperature {sampling[1]} must be > 0 and --top-p {sampling[2]} in "
                     "(0, 1]")

  def fn(params, images, seeds=None):
    model = nnx.merge(graphdef, params)
    ngram = eval_cfg.no_repeat_ngram_size
    if sampling is not None:
      base = jax.random.key(sampling[0])
      keys = jax.vmap(jax.random.fold_in, (None, 0))(base, seeds)
      n = max(num_return, 1)
      if num_return:  # image b's draw j: row b * n + j, its key folded with j
        images = jnp.repeat(images, n, axis=0)
        draws = jnp.tile(jnp.arange(n), seeds.shape[0])
        keys = jax.vmap(jax.random.fold_in)(jnp.repeat(keys, n), draws)
      out = greedy(model, images, eval_cfg.max_length, bos, eos, pad, ngram, with_logprob,
                   Sampling(keys, sampling[1], sampling[2]))
      if not num_return:
        return out
      ids, sums = out if with_logprob else (out, None)
      ids = ids.reshape(-1, n, ids.shape[-1])
      return (ids, sums.reshape(-1, n)) if with_logprob else ids
    if eval_cfg.num_beams == 1:
      out = greedy(model, images, eval_cfg.max_length, bos, eos, pad, ngram, with_logprob)
      if not num_return:
        return out
      return jax.tree.map(lambda x: x[:, None], out)  # the one best, as [B, 1, ...]
    return beam_search(model, images, eval_cfg.max_length, eval_cfg.num_beams, bos, eos, pad,
                       eval_cfg.length_penalty, stopping, ngram, with_logprob, num_return)

  if batch_sharding is None:
    return jax.jit(fn)
  ins = (param_shardings, batch_sharding) + ((batch_sharding,) if sampling else ())
  return jax.jit(fn, in_shardings=ins,
                 out_shardings=(batch_sharding, batch_sharding) if with_logprob
                 else batch_sharding)


def decode_text(tok, ids, eos: int) -> list[str]:
  """Token ids to caption strings, cut at the first EOS."""
  out = []
  for row in ids.tolist():
    if eos in row:
      row = row[:row.index(eos)]
    out.append(tok.decode(row, skip_special_tokens=True).strip())
  return out


def beam_search(model: Captioner, images: jax.Array, max_length: int, num_beams: int,
                bos: Start, eos: int, pad: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False, no_repeat_ngram_size: int = 0,
                with_logprob: bool = False, num_return: int = 0):
  """Beam search as `transformers`' `generate(num_beams=...)` computes it.

  Keeps 2 x num_beams candidates a step, finished hypotheses scored by
  sum log-prob / length ** length_penalty (the length of what was
  generated), and the same stopping rules (`early_stopping` True, False or
  "never"), and `no_repeat_ngram_size`. `bos`: the start token, or a tuple
  of it and a prompt's tokens, which the captions continue (and do not
  include). images [B, H, W, C] uint8 ->
  the best hypothesis per image [B, max_length], padded after EOS (with
  `with_logprob`, and the sum of its tokens' log-probabilities [B]); with
  `num_return` N > 0, the N best [B, N, max_length] (and [B, N]).
  """
  b, k = images.shape[0], num_beams
  start = _start(bos)
  s0 = len(start)
  keep = 2 * k
  total = max_length + s0  # the start tokens, then max_length new tokens
  neg = jnp.float32(-1.0e9)
  cross = model.cross_kv(images)  # once per image, shared by its beams
  decode = _pure_decoder(model)
  cache = _prefill(decode, start, cross, model.decoder.init_cache(b * k, total - 1), b * k)
  running = jnp.full((b, k, total), pad, jnp.int32).at[:, :, :s0].set(
      jnp.asarray(start, jnp.int32))
  state = dict(
      cur=jnp.int32(s0), running=running, running_scores=jnp.tile(
          jnp.concatenate([jnp.zeros((1,)), jnp.full((k - 1,), neg)]), (b, 1)).astype(jnp.float32),
      sequences=running, scores=jnp.full((b, k), neg), sums=jnp.zeros((b, k), jnp.float32),
      finished=jnp.zeros((b, k), bool),
      open=jnp.ones((b, 1), bool), all_stopped=jnp.bool_(False), cache=cache)
  top_mask = jnp.arange(keep) < k

  def gather(x, idx):  # x [B, N, ...], idx [B, M] -> [B, M, ...]
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def cond(s):
    improvable = jnp.any(s["open"])
    beams_left = ~(jnp.all(s["finished"]) & (early_stopping is True))
    return improvable & beams_left & ~s["all_stopped"]

  def body(s):
    cur = s["cur"]
    last = jax.lax.dynamic_slice_in_dim(s["running"], cur - 1, 1, axis=2).reshape(b * k, 1)
    logits, cache = decode(last, cross, s["cache"], cur - 1)
    logits = logits[:, -1].astype(jnp.float32)
    # Each beam's best `keep` tokens hold the step's best `keep` overall; their
    # log-probabilities are computed as log_softmax does, (x - max) - lse.
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    lse = jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1, keepdims=True))
    if no_repeat_ngram_size:  # banned after the normalisation, as transformers does
      ban = banned_tokens(s["running"].reshape(b * k, total), cur, no_repeat_ngram_size,
                          logits.shape[-1])
      logits = jnp.where(ban, -jnp.inf, logits)
    beam_top, beam_tokens = top_k(logits, keep)
    logp = (beam_top - row_max) - lse + s["running_scores"][:, :, None].reshape(b * k, 1)
    top_logp, pick = jax.lax.top_k(logp.reshape(b, k * keep), keep)
    src = pick // keep
    tokens = jnp.take_along_axis(beam_tokens.reshape(b, k * keep), pick, axis=1)
    cand = gather(s["running"], src)
    cand = jax.lax.dynamic_update_slice_in_dim(cand, tokens[:, :, None], cur, axis=2)
    stopped = (tokens == eos) | (cur + 1 >= total)

    # The best K candidates that did not stop keep running.
    run_logp = top_logp + stopped.astype(jnp.float32) * neg
    _, nxt = jax.lax.top_k(run_logp, k)
    running = gather(cand, nxt)
    running_scores = gather(run_logp, nxt)
    beam_src = gather(src, nxt)  # which old beam each new one continues
    flat = (jnp.arange(b)[:, None] * k + beam_src).reshape(-1)
    cache = model.decoder.reorder_cache(cache, flat)  # arrays only: no module state

    # Those of the top K that stopped join the finished hypotheses.
    just_done = stopped & top_mask[None, :]
    done_scores = top_logp / ((cur - s0 + 1).astype(jnp.float32) ** length_penalty)
    full = jnp.all(s["finished"], axis=-1, keepdims=True) & (early_stopping is True)
    done_scores += full.astype(jnp.float32) * neg
    done_scores += (~s["open"]).astype(jnp.float32) * neg
    done_scores += (~just_done).astype(jnp.float32) * neg
    merged_scores = jnp.concatenate([s["scores"], done_scores], axis=1)
    _, best = jax.lax.top_k(merged_scores, k)
    sequences = gather(jnp.concatenate([s["sequences"], cand], axis=1), best)
    scores = gather(merged_scores, best)
    sums = gather(jnp.concatenate([s["sums"], top_logp], axis=1), best)
    finished = gather(jnp.concatenate([s["finished"], just_done], axis=1), best)

    cur = cur + 1
    if early_stopping == "never" and length_penalty > 0.0:
      best_len = jnp.float32(max_length)
    else:
      best_len = (cur - s0).astype(jnp.float32)
    best_running = running_scores[:, :1] / (best_len ** length_penalty)
    worst_done = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), neg)
    open_ = s["open"] & jnp.any(best_running > worst_done, axis=-1, keepdims=True)
    return dict(cur=cur, running=running, running_scores=running_scores, sequences=sequences,
                scores=scores, sums=sums, finished=finished, open=open_,
                all_stopped=jnp.all(stopped), cache=cache)

  out = jax.lax.while_loop(cond, body, state)
  if num_return:
    ids, sums = out["sequences"][:, :num_return, s0:], out["sums"][:, :num_return]
  else:
    ids, sums = out["sequences"][:, 0, s0:], out["sums"][:, 0]
  return (ids, sums) if with_logprob else ids
