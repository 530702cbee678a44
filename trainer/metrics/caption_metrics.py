"""Caption metrics as the COCO caption evaluation (pycocoevalcap) computes
them, in-process and without Java or downloads: its PTB tokenization
(`trainer.metrics.ptb_tokenizer`), BLEU-1..4 (corpus level, closest reference length),
ROUGE-L (beta 1.2) and CIDEr-D (sigma 6, clipped, x10), the same numbers to
the last digits. The scorers work on arrays of n-gram ids, all images at once.

Also METEOR through pycocoevalcap's own jar, where Java and pycocoevalcap are
installed, and ROUGE-1, ROUGE-2 and ROUGE-Lsum through `rouge_score`, as the
old Flax script reported them.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import shutil
from typing import Sequence

import numpy as np

from trainer.metrics import ptb_tokenizer

N = 4  # n-gram orders of BLEU and CIDEr-D


def tokenize(captions: Sequence[str]) -> list[str]:
  """The COCO evaluation's tokens of these captions, in this order."""
  return ptb_tokenizer.tokenize_captions(captions)


class _Corpus:
  """Tokenized hypotheses (one per image) and references (any number per
  image) as word ids, and the ids and counts of their n-grams."""

  def __init__(self, hyps: Sequence[str], refs: Sequence[Sequence[str]], split):
    if not len(hyps):
      raise ValueError("no captions to score")
    if len(hyps) != len(refs):
      raise ValueError(f"{len(hyps)} predictions for {len(refs)} reference sets")
    empty = [i for i, rs in enumerate(refs) if not len(rs)]
    if empty:
      raise ValueError(f"image {empty[0]} has no reference captions")
    self.images = len(hyps)
    self.per_image = np.array([len(rs) for rs in refs])
    self.ref_image = np.repeat(np.arange(self.images), self.per_image)
    # where each image's references begin, for reductions over them
    self.ref_start = np.concatenate([[0], np.cumsum(self.per_image)[:-1]])
    texts = [*hyps, *(r for rs in refs for r in rs)]
    sentences = [split(t) for t in texts]
    # ROUGE splits on single spaces, BLEU and CIDEr on any whitespace
    self.space_split = all(t and t == " ".join(w) for t, w in zip(texts, sentences))
    vocab: dict[str, int] = {}
    flat = np.array([vocab.setdefault(w, len(vocab)) for s in sentences for w in s], np.int64)
    self.lengths = np.array([len(s) for s in sentences])
    self.vocab = max(len(vocab), 1)
    self.words = flat

  @functools.cached_property
  def ngrams(self):
    """Per order n: (sentence, n-gram id, count) of every distinct n-gram."""
    flat = self.words
    sentence = np.repeat(np.arange(len(self.lengths)), self.lengths)
    end = np.repeat(np.cumsum(self.lengths), self.lengths)
    pos = np.arange(len(flat))
    out, ids, size = [], flat, self.vocab
    for n in range(1, N + 1):
      if n > 1:  # extend each (n-1)-gram by the next word, renumbered densely
        ok = pos + n <= end
        key = np.full(len(flat), -1, np.int64)
        key[ok] = ids[ok] * self.vocab + flat[np.minimum(pos + n - 1, len(flat) - 1)][ok]
        uniq, inv = np.unique(key[ok], return_inverse=True)
        ids = np.full(len(flat), -1, np.int64)
        ids[ok] = inv
        size = max(len(uniq), 1)
      ok = ids >= 0
      pair, counts = np.unique(sentence[ok] * size + ids[ok], return_counts=True)
      out.append((pair // size, pair % size, counts, size))
    return out

  def order(self, k: int):
    """N-grams of order k + 1: (sentence, id, count, ids in all, whether in a
    reference, image)."""
    sent, gram, count, size = self.ngrams[k]
    is_ref = sent >= self.images
    image = np.where(is_ref, self.ref_image[np.maximum(sent - self.images, 0)], sent)
    return sent, gram, count, size, is_ref, image


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = N) -> list[float]:
  """Corpus BLEU-1..n of tokenized captions, pycocoevalcap's BleuScorer with
  option 'closest'."""
  return _bleu(_Corpus(hyps, refs, str.split), n)


def _bleu(c: _Corpus, n: int = N) -> list[float]:
  h_len, r_len = c.lengths[:c.images], c.lengths[c.images:]
  correct, guess = [], []
  for k in range(n):
    sent, gram, count, size, is_ref, image = c.order(k)
    key = image * size + gram
    # the most times each n-gram occurs in one reference of its image
    rkey, rcount = key[is_ref], count[is_ref]
    order = np.argsort(rkey, kind="stable")
    rkey, rcount = rkey[order], rcount[order]
    uniq, start = np.unique(rkey, return_index=True)
    most = np.maximum.reduceat(rcount, start) if len(rcount) else rcount
    hkey, hcount = key[~is_ref], count[~is_ref]
    at = np.searchsorted(uniq, hkey).clip(0, max(len(uniq) - 1, 0))
    found = (uniq[at] == hkey) if len(uniq) else np.zeros(len(hkey), bool)
    correct.append(int(np.minimum(hcount, np.where(found, most[at] if len(most) else 0, 0)).sum()))
    guess.append(int(np.maximum(h_len - k, 0).sum()))
  # the reference length closest to each hypothesis, the shorter on a tie
  diff = np.abs(r_len - h_len[c.ref_image])
  closest = np.minimum.reduceat(diff * (int(r_len.max()) + 1) + r_len, c.ref_start) % (int(r_len.max()) + 1)
  test_len, ref_len = int(h_len.sum()), int(closest.sum())
  tiny, small = 1e-15, 1e-9  # as pycocoevalcap adds them
  scores, product = [], 1.0
  for k in range(n):
    product *= float(correct[k] + tiny) / (guess[k] + small)
    scores.append(product ** (1.0 / (k + 1)))
  ratio = (test_len + tiny) / (ref_len + small)
  if ratio < 1:
    scores = [s * math.exp(1 - 1 / ratio) for s in scores]
  return scores


def _lcs_bits(a: Sequence[int], b: Sequence[int]) -> int:
  """Length of the longest common subsequence, bit-parallel over b."""
  masks: dict[int, int] = {}
  for j, y in enumerate(b):
    masks[y] = masks.get(y, 0) | (1 << j)
  full = (1 << len(b)) - 1
  v = full
  for x in a:
    u = v & masks.get(x, 0)
    v = ((v + u) | (v - u)) & full
  return len(b) - bin(v).count("1")


def _lcs(h: np.ndarray, r: np.ndarray, h_len: np.ndarray, r_len: np.ndarray) -> np.ndarray:
  """LCS lengths of many (hypothesis, reference) pairs of padded id rows,
  by dynamic programming over all pairs at once."""
  prev = np.zeros((len(h), r.shape[1] + 1), np.int32)
  for i in range(h.shape[1]):
    eq = h[:, i:i + 1] == r
    cur = np.zeros_like(prev)
    for j in range(r.shape[1]):
      cur[:, j + 1] = np.where(eq[:, j], prev[:, j] + 1, np.maximum(prev[:, j + 1], cur[:, j]))
    prev = cur
  return prev[np.arange(len(h)), r_len]


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]], beta: float = 1.2) -> float:
  """Mean sentence ROUGE-L of tokenized captions, from the best precision
  and the best recall over each image's references (pycocoevalcap's Rouge)."""
  return _rouge_l(_Corpus(hyps, refs, lambda s: s.split(" ")), beta)


def _rouge_l(c: _Corpus, beta: float = 1.2) -> float:
  starts = np.concatenate([[0], np.cumsum(c.lengths)])
  h_of = c.ref_image  # the hypothesis of each reference
  lh, lr = c.lengths[h_of], c.lengths[c.images:]
  lcs = np.zeros(len(lr), np.int64)
  big = lh * lr > 4096  # long pairs: bit-parallel, one by one
  for p in np.flatnonzero(big):
    a, b = h_of[p], c.images + p
    lcs[p] = _lcs_bits(c.words[starts[a]:starts[a + 1]], c.words[starts[b]:starts[b + 1]])
  small = np.flatnonzero(~big)
  small = small[np.lexsort((lr[small], lh[small]))]
  for chunk in np.array_split(small, max(1, math.ceil(len(small) / 2048))):
    if not len(chunk):
      continue
    width_h, width_r = int(lh[chunk].max()), int(lr[chunk].max())
    h = np.full((len(chunk), width_h), -1, np.int64)
    r = np.full((len(chunk), width_r), -2, np.int64)
    for row, p in enumerate(chunk):
      a, b = h_of[p], c.images + p
      h[row, :lh[p]] = c.words[starts[a]:starts[a + 1]]
      r[row, :lr[p]] = c.words[starts[b]:starts[b + 1]]
    lcs[chunk] = _lcs(h, r, lh[chunk], lr[chunk])
  prec = np.maximum.reduceat(lcs / lh, c.ref_start)
  rec = np.maximum.reduceat(lcs / lr, c.ref_start)
  with np.errstate(invalid="ignore", divide="ignore"):
    f = ((1 + beta**2) * prec * rec) / (rec + beta**2 * prec)
  return float(np.mean(np.where((prec != 0) & (rec != 0), f, 0.0)))


def cider_d(hyps: Sequence[str], refs: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
  """CIDEr-D of tokenized captions, document frequencies from these
  references (pycocoevalcap's Cider)."""
  return _cider_d(_Corpus(hyps, refs, str.split), sigma)


def _cider_d(c: _Corpus, sigma: float = 6.0) -> float:
  n_refs = len(c.ref_image)
  log_images = np.log(float(c.images))
  val = np.zeros((n_refs, N))
  norm_h, norm_r = np.zeros((c.images, N)), np.zeros((n_refs, N))
  for k in range(N):
    sent, gram, count, size, is_ref, image = c.order(k)
    rkey = image[is_ref] * size + gram[is_ref]
    order = np.argsort(rkey, kind="stable")
    rkey = rkey[order]
    # document frequency: the number of images whose references hold the n-gram
    first = np.concatenate([[True], rkey[1:] != rkey[:-1]]) if len(rkey) else rkey.astype(bool)
    df = np.bincount(rkey[first] % size, minlength=size)
    weight = count * (log_images - np.log(np.maximum(1.0, df[gram])))
    norm_h[:, k] = np.sqrt(np.bincount(sent[~is_ref], weight[~is_ref] ** 2, minlength=c.images))
    norm_r[:, k] = np.sqrt(np.bincount(sent[is_ref] - c.images, weight[is_ref] ** 2,
                                       minlength=n_refs))
    # each hypothesis n-gram against the same n-gram in its image's references
    rsent, rweight = sent[is_ref][order] - c.images, weight[is_ref][order]
    hkey, hweight = image[~is_ref] * size + gram[~is_ref], weight[~is_ref]
    lo, hi = np.searchsorted(rkey, hkey, "left"), np.searchsorted(rkey, hkey, "right")
    reps = hi - lo
    at = np.repeat(lo - np.concatenate([[0], np.cumsum(reps)[:-1]]), reps) + np.arange(reps.sum())
    wh, wr = np.repeat(hweight, reps), rweight[at]
    val[:, k] = np.bincount(rsent[at], np.minimum(wh, wr) * wr, minlength=n_refs)
  nh = norm_h[c.ref_image]
  both = (nh != 0) & (norm_r != 0)
  val = np.where(both, val / np.where(both, nh * norm_r, 1.0), val)
  # lengths in bigrams, as pycocoevalcap counts them
  bigrams = np.maximum(c.lengths - 1, 0).astype(float)
  delta = bigrams[:c.images][c.ref_image] - bigrams[c.images:]
  val *= (np.e ** (-(delta**2) / (2 * sigma**2)))[:, None]
  per_image = np.add.reduceat(val, c.ref_start, axis=0).mean(axis=1) / c.per_image * 10.0
  return float(np.mean(per_image))


def tokenized(predictions: Sequence[str], references: Sequence[Sequence[str]],
              each: bool = False):
  """Predictions and references tokenized as the COCO evaluation does: all
  references in image order in one pass, then all predictions in another;
  with `each`, every caption as that evaluation tokenizes it alone."""
  tok = ptb_tokenizer.tokenize_each if each else tokenize
  flat = tok([r for rs in references for r in rs])
  hyps = tok(predictions)
  at = np.concatenate([[0], np.cumsum([len(rs) for rs in references])])
  return hyps, [flat[at[i]:at[i + 1]] for i in range(len(references))]


def score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
  """BLEU-1..4, ROUGE-L and CIDEr-D of raw captions, tokenized as the COCO
  evaluation does."""
  hyps, refs = tokenized(predictions, references)
  corpus = _Corpus(hyps, refs, str.split)
  b = _bleu(corpus)
  out = {f"bleu{k + 1}": b[k] for k in range(N)}
  out["rouge_l"] = _rouge_l(corpus) if corpus.space_split else rouge_l(hyps, refs)
  out["cider"] = _cider_d(corpus)
  return out


def meteor_available() -> bool:
  """Whether METEOR can be computed here: Java and pycocoevalcap's jar."""
  return (shutil.which("java") is not None
          and importlib.util.find_spec("pycocoevalcap") is not None)


def meteor(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """METEOR 1.5 through pycocoevalcap's jar, on captions tokenized as the
  COCO evaluation does (needs Java; see meteor_available)."""
  from pycocoevalcap.meteor.meteor import Meteor

  hyps, refs = tokenized(predictions, references)
  gts = dict(enumerate(refs))
  res = {i: [h] for i, h in enumerate(hyps)}
  value, _ = Meteor().compute_score(gts, res)
  return float(value)


def rouge_score_metrics(predictions: Sequence[str],
                        references: Sequence[Sequence[str]]) -> dict[str, float]:
  """ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures through `rouge_score`, as the
  old Flax captioning script reported them (Porter stemming, x100), but
  deterministic and offline: the mean over images of the best score against
  any of the image's references, where the old script drew a bootstrap median
  through `evaluate` against one reference."""
  from rouge_score import rouge_scorer

  keys = ("rouge1", "rouge2", "rougeLsum")
  scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
  totals = dict.fromkeys(keys, 0.0)
  for p, rs in zip(predictions, references):
    for k, v in scorer.score_multi(list(rs), p).items():
      totals[k] += v.fmeasure
  n = max(len(predictions), 1)
  return {"rouge1": totals["rouge1"] / n * 100, "rouge2": totals["rouge2"] / n * 100,
          "rouge_lsum": totals["rougeLsum"] / n * 100}
