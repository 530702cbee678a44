"""Self-critical sequence training (`train.objective = "scst"`; Rennie et al.
2017, with the "new self-critical" baseline of Luo 2020).

Each step, for every image of the batch, `train.scst.samples` captions are
drawn on the mesh (a key of the seed, the step and the image's row, so a
resumed run draws what the first one drew) and the greedy caption decoded.
Every process scores its own rows on its host: CIDEr-D against the image's
references, exact to the COCO evaluation but with document frequencies from
the training split's references (computed once, kept in the run directory
as `scst_df.json`), optionally plus `bleu_weight` x sentence BLEU-4. The
baseline of a sample is the mean reward of the image's other samples
(`baseline="mean"`) or its greedy caption's (`"greedy"`), and the step's
loss is the advantage-weighted negative log-probability of each sampled
token, one teacher-forced pass over the K samples behind one encoder pass
(`trainer.step`, the batch's `advantage`); with `xent_weight` > 0 the
image's references join that pass, their tokens' cross-entropy weighted by
it (a mixed objective, as Paulus et al. 2018).
"""

from __future__ import annotations

import collections
import json
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from trainer import generate
from trainer.metrics import caption_metrics, ptb_tokenizer

N = caption_metrics.N
DF_FILE = "scst_df.json"
BASELINES = ("mean", "greedy")


def _grams(words: Sequence[str]) -> list[collections.Counter]:
  """The counts of each order's n-grams (1..N) of a tokenized caption."""
  return [collections.Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
          for n in range(1, N + 1)]


class DocumentFrequencies:
  """For each n-gram, the number of training images whose references hold
  it, and the number of images: CIDEr-D's idf over the training split, as
  the SCST recipes keep it (pycocoevalcap's, computed over a whole corpus)."""

  def __init__(self, counts: dict[str, int], images: int):
    self.counts, self.images = counts, images
    self.log_images = math.log(float(images))

  @classmethod
  def build(cls, references: Iterable[Sequence[str]]) -> "DocumentFrequencies":
    """From each training image's raw reference captions."""
    refs = [list(r) for r in references if len(r)]
    flat = ptb_tokenizer.tokenize_each([c for r in refs for c in r])
    counts: collections.Counter = collections.Counter()
    at = 0
    for r in refs:
      seen = set()
      for words in flat[at:at + len(r)]:
        for grams in _grams(words.split()):
          seen.update(grams)
      counts.update(seen)
      at += len(r)
    return cls(dict(counts), len(refs))

  def to_json(self) -> str:
    return json.dumps({"images": self.images, "counts": self.counts})

  @classmethod
  def from_json(cls, text: str) -> "DocumentFrequencies":
    d = json.loads(text)
    return cls(d["counts"], d["images"])

  def vector(self, words: Sequence[str]):
    """(tf-idf weights of each order, their norms, length in bigrams)."""
    vec, norms = [], []
    for grams in _grams(words):
      v = {g: c * (self.log_images - math.log(max(1.0, self.counts.get(g, 0.0))))
           for g, c in grams.items()}
      vec.append(v)
      norms.append(math.sqrt(sum(x * x for x in v.values())))
    return vec, norms, max(len(words) - 1, 0)


def cider_d(hyps: Sequence[str], refs: Sequence[Sequence[str]], df: DocumentFrequencies,
            sigma: float = 6.0) -> np.ndarray:
  """Each tokenized hypothesis's CIDEr-D against its tokenized references
  (`refs[i]` for `hyps[i]`), with the document frequencies `df`: pycocoevalcap's
  CiderD (clipped counts, length penalty sigma, x10) sentence by sentence."""
  cache: dict[str, tuple] = {}

  def vec(text):
    if text not in cache:
      cache[text] = df.vector(text.split())
    return cache[text]

  out = np.zeros(len(hyps))
  for i, (h, rs) in enumerate(zip(hyps, refs)):
    vh, nh, lh = vec(h)
    total = np.zeros(N)
    for r in rs:
      vr, nr, lr = vec(r)
      penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
      for n in range(N):
        val = sum(min(w, vr[n][g]) * vr[n][g] for g, w in vh[n].items() if g in vr[n])
        if nh[n] != 0 and nr[n] != 0:
          val /= nh[n] * nr[n]
        total[n] += val * penalty
    out[i] = total.mean() / max(len(rs), 1) * 10.0
  return out


def bleu4(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
  """Each tokenized hypothesis's BLEU-4 against its references alone."""
  return np.array([caption_metrics.bleu([h], [rs])[N - 1] for h, rs in zip(hyps, refs)])


def score(texts: Sequence[str], refs: Sequence[Sequence[str]], df: DocumentFrequencies,
          bleu_weight: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """(reward, CIDEr-D) of raw captions against raw references, each
  PTB-tokenized as the COCO evaluation tokenizes it alone (a sampled
  caption's odd characters cannot shift another's tokens): the reward is
  CIDEr-D (+ bleu_weight x BLEU-4)."""
  hyps, toks = caption_metrics.tokenized(texts, refs, each=True)
  cider = cider_d(hyps, toks, df)
  return (cider + bleu_weight * bleu4(hyps, toks) if bleu_weight else cider), cider


def advantages(sample: np.ndarray, greedy: np.ndarray | None, baseline: str
               ) -> tuple[np.ndarray, np.ndarray]:
  """(advantage, baseline) of each sample [B, K]: its reward less the mean
  of the image's other samples' ("mean"), or its greedy caption's."""
  k = sample.shape[1]
  if baseline == "mean":
    if k < 2:
      raise ValueError("train.scst.baseline='mean' needs train.scst.samples >= 2")
    base = (sample.sum(axis=1, keepdims=True) - sample) / (k - 1)
  elif baseline == "greedy":
    base = np.broadcast_to(greedy[:, None], sample.shape)
  else:
    raise ValueError(f"train.scst.baseline: {baseline!r} is not one of {', '.join(BASELINES)}")
  return sample - base, base


def check_config(cfg: ConfigDict) -> None:
  s = cfg.train.scst
  if s.samples < 1 or s.temperature <= 0 or not 0 < s.top_p <= 1 or s.top_k < 0:
    raise ValueError(f"train.scst: samples={s.samples} (>= 1), temperature={s.temperature} "
                     f"(> 0), top_p={s.top_p} (in (0, 1]), top_k={s.top_k} (>= 0)")
  if s.baseline not in BASELINES:
    raise ValueError(f"train.scst.baseline: {s.baseline!r} is not one of {', '.join(BASELINES)}")
  if s.baseline == "mean" and s.samples < 2:
    raise ValueError("train.scst.baseline='mean' needs train.scst.samples >= 2")
  if s.get("xent_weight", 0.0) < 0:
    raise ValueError(f"train.scst.xent_weight: {s.xent_weight} (>= 0)")
  if cfg.train.accum_steps != 1:
    raise ValueError("train.objective='scst' takes train.accum_steps=1")


def make_sample_fn(graphdef, cfg: ConfigDict, start, eos: int, pad: int, param_sh, batch_sh):
  """Jitted (params, images [B, ...], step) -> (samples [B, K, T], greedy
  captions [B, T]): sample j of global row r drawn with a key of (seed,
  step, r, j), so any layout of the batch draws the same."""
  s = cfg.train.scst
  k, length = s.samples, s.max_length

  def fn(params, images, step):
    model = nnx.merge(graphdef, params)
    b = images.shape[0]
    base = jax.random.fold_in(jax.random.key(cfg.seed ^ 0x5C57), step)
    rows = jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(b))
    keys = jax.vmap(jax.random.fold_in)(jnp.repeat(rows, k), jnp.tile(jnp.arange(k), b))
    sampling = generate.Sampling(keys, s.temperature, s.top_p, s.top_k)
    samples = generate.greedy(model, images, length, start, eos, pad, sampling=sampling,
                              per_image=k)
    best = generate.greedy(model, images, length, start, eos, pad)
    return samples.reshape(b, k, length), best

  step_sh = jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec())
  return jax.jit(fn, in_shardings=(param_sh, batch_sh, step_sh),
                 out_shardings=(batch_sh, batch_sh))


def _local_rows(x: jax.Array, mesh) -> np.ndarray:
  """This process's rows of a global array sharded over the batch axes."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  from trainer import sharding
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, jax.sharding.PartitionSpec(sharding.BATCH)))


def document_frequencies(cfg: ConfigDict, workdir: str) -> DocumentFrequencies:
  """The training split's document frequencies: read from the run
  directory, or computed from the references and written there (process 0)."""
  from pipeline import fs, mixture
  path = fs.join(workdir, DF_FILE)
  if fs.exists(path):
    return DocumentFrequencies.from_json(fs.read_text(path))
  df = DocumentFrequencies.build(caps for _, caps in
                                 mixture.ids_and_captions(mixture.open_train(cfg.data)))
  if jax.process_index() == 0:
    fs.write_text(path, df.to_json())
  return df


class Critic:
  """Turns the loader's batch (images, the references as tokenized
  captions) into an SCST batch: sampled captions as inputs and labels, each
  with its advantage, and the step's reward scalars."""

  def __init__(self, cfg: ConfigDict, graphdef, mesh, param_sh, tokenizer_dir: str,
               workdir: str):
    from pipeline import tokenizer as tokenizer_lib, transforms
    from trainer import sharding
    check_config(cfg)
    self.mesh, self.s = mesh, cfg.train.scst
    self.tok = tokenizer_lib.load(tokenizer_dir)
    dec = cfg.model.decoder
    self.eos, self.pad = dec.eos_token_id, dec.pad_token_id
    self.start = transforms.start_tokens(self.tok, cfg.model, dec.bos_token_id)
    self.sample = make_sample_fn(graphdef, cfg, self.start, self.eos, self.pad,
                                 param_sh, sharding.batch_sharding(mesh))
    self.df = document_frequencies(cfg, workdir)

  def references(self, local: dict) -> list[list[str]]:
    """Each image's distinct references, read back from its caption tokens."""
    out = []
    for labels, mask in zip(local["labels"], local["loss_mask"]):
      rows = [[t for t, m in zip(lab, msk) if m and t != self.eos]
              for lab, msk in zip(labels.tolist(), mask.tolist()) if any(msk)]
      out.append(list(dict.fromkeys(self.tok.decode(r, skip_special_tokens=True).strip()
                                    for r in rows)))
    return out

  def teacher_forced(self, samples: np.ndarray) -> dict[str, np.ndarray]:
    """[B, K, T] samples after the start tokens: inputs, labels and the mask
    of the sampled tokens up to and including EOS."""
    b, k, t = samples.shape
    start = np.broadcast_to(np.asarray(self.start, np.int32), (b, k, len(self.start)))
    seq = np.concatenate([start, samples.astype(np.int32)], axis=-1)
    ended = samples == self.eos
    length = np.where(ended.any(-1), ended.argmax(-1) + 1, t)  # tokens that count
    mask = np.zeros((b, k, seq.shape[-1] - 1), np.float32)
    mask[..., len(self.start) - 1:] = np.arange(t) < length[..., None]
    return {"input_ids": seq[..., :-1], "labels": seq[..., 1:], "loss_mask": mask,
            "length": length}

  def with_references(self, batch: dict, local: dict) -> dict:
    """The samples' batch [B, K, T] and the references' [B, C, T'] as one
    [B, K + C, max(T, T')]: each reference's tokens carry the loss weight
    `xent_weight` in place of an advantage (cross-entropy mixed in), and
    `sampled` tells the step which rows were drawn."""
    t = max(batch["input_ids"].shape[-1], local["input_ids"].shape[-1])

    def join(key, value=0):
      pad = lambda x: np.pad(x, [(0, 0), (0, 0), (0, t - x.shape[-1])], constant_values=value)
      return np.concatenate([pad(batch[key]), pad(local[key])], 1).astype(batch[key].dtype)

    b, k, c = *batch["advantage"].shape, local["input_ids"].shape[1]
    return {**batch, "input_ids": join("input_ids", self.pad),
            "labels": join("labels", self.pad), "loss_mask": join("loss_mask"),
            "advantage": np.concatenate([batch["advantage"], np.full(
                (b, c), self.s.xent_weight, np.float32)], 1),
            "sampled": np.concatenate([np.ones((b, k), np.float32),
                                       np.zeros((b, c), np.float32)], 1)}

  def __call__(self, params, local: dict, step: int) -> tuple[dict, dict[str, float]]:
    from trainer import generate, sharding
    images = sharding.global_batch({"image": local["image"]}, self.mesh)["image"]
    samples, best = self.sample(params, images, jnp.int32(step))
    samples, best = _local_rows(samples, self.mesh), _local_rows(best, self.mesh)
    b, k, t = samples.shape
    refs = self.references(local)
    usable = np.array([bool(r) for r in refs]) & (local["skipped"] == 0)
    refs = [r if r else [""] for r in refs]
    texts = generate.decode_text(self.tok, np.concatenate([samples.reshape(b * k, t), best]),
                                 self.eos)
    reward, cider = score(texts, [refs[i // k] for i in range(b * k)] + refs, self.df,
                          self.s.bleu_weight)
    sample_r, greedy_r = reward[:b * k].reshape(b, k), reward[b * k:]
    adv, base = advantages(sample_r, greedy_r, self.s.baseline)
    adv = adv * usable[:, None]
    batch = self.teacher_forced(samples)
    length = batch.pop("length")
    batch["loss_mask"] *= usable[:, None, None]
    batch.update(image=local["image"], skipped=local["skipped"],
                 advantage=adv.astype(np.float32))
    if self.s.get("xent_weight", 0.0):
      batch = self.with_references(batch, local)
    u = usable[:, None]
    sums = np.array([(sample_r * u).sum() / k, (base * u).sum() / k, adv.sum() / k,
                     (adv ** 2).sum() / k, (cider[:b * k].reshape(b, k) * u).sum() / k,
                     (cider[b * k:] * usable).sum(), (length * u).sum() / k, usable.sum()])
    if jax.process_count() > 1:  # every process's rows: a few sums, no text
      from jax.experimental import multihost_utils
      sums = np.asarray(multihost_utils.process_allgather(sums)).sum(axis=0)
    m = max(sums[-1], 1.0)
    mean_adv = sums[2] / m
    scalars = {"scst/reward": sums[0] / m, "scst/baseline": sums[1] / m,
               "scst/advantage_std": math.sqrt(max(sums[3] / m - mean_adv ** 2, 0.0)),
               "scst/sample_cider": sums[4] / m, "scst/greedy_cider": sums[5] / m,
               "scst/sample_length": sums[6] / m}
    return batch, scalars
