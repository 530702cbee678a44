"""Caption metrics as the COCO caption evaluation (pycocoevalcap) computes
them: BLEU-1..4 (corpus level, closest reference length), ROUGE-L (beta 1.2)
and CIDEr-D (sigma 6, clipped, x10), in-process, without Java or downloads.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Sequence

import numpy as np

# Tokens the COCO evaluation drops after PTB tokenisation.
_PUNCTUATION = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?",
                "!", ",", ":", "-", "--", "...", ";"}
_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]+")


def tokenize(caption: str) -> str:
  """Lower-cased words separated by single spaces, punctuation removed."""
  tokens = _TOKEN.findall(caption.lower())
  return " ".join(t for t in tokens if t not in _PUNCTUATION)


def _ngrams(words: Sequence[str], n: int) -> collections.Counter:
  counts = collections.Counter()
  for k in range(1, n + 1):
    for i in range(len(words) - k + 1):
      counts[tuple(words[i:i + k])] += 1
  return counts


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4) -> list[float]:
  """Corpus BLEU-1..n, pycocoevalcap's BleuScorer with option 'closest'."""
  tiny, small = 1e-15, 1e-9  # added to numerators and denominators, as there
  guess, correct = [0] * n, [0] * n
  test_len = ref_len = 0
  for hyp, rs in zip(hyps, refs):
    words = hyp.split()
    max_counts: dict = {}
    ref_lens = []
    for r in rs:
      rw = r.split()
      ref_lens.append(len(rw))
      for g, c in _ngrams(rw, n).items():
        max_counts[g] = max(max_counts.get(g, 0), c)
    test_len += len(words)
    ref_len += min(ref_lens, key=lambda x: (abs(x - len(words)), x))
    for g, c in _ngrams(words, n).items():
      correct[len(g) - 1] += min(max_counts.get(g, 0), c)
    for k in range(n):
      guess[k] += max(0, len(words) - k)
  scores, product = [], 1.0
  for k in range(n):
    product *= (correct[k] + tiny) / (guess[k] + small)
    scores.append(product ** (1.0 / (k + 1)))
  ratio = (test_len + tiny) / (ref_len + small)
  if ratio < 1:
    scores = [s * math.exp(1 - 1 / ratio) for s in scores]
  return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]], beta: float = 1.2) -> float:
  """Mean sentence ROUGE-L, from the best precision and best recall over references."""
  scores = []
  for hyp, rs in zip(hyps, refs):
    c = hyp.split(" ")
    prec, rec = [], []
    for r in rs:
      rw = r.split(" ")
      lcs = _lcs(rw, c)
      prec.append(lcs / len(c))
      rec.append(lcs / len(rw))
    p, r_ = max(prec), max(rec)
    scores.append((1 + beta**2) * p * r_ / (r_ + beta**2 * p) if p and r_ else 0.0)
  return float(np.mean(scores))


def cider_d(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> float:
  """CIDEr-D with document frequencies from these references, as pycocoevalcap."""
  ref_counts = [[_ngrams(r.split(), n) for r in rs] for rs in refs]
  df = collections.Counter()
  for counts in ref_counts:
    for g in set(g for c in counts for g in c):
      df[g] += 1
  log_images = math.log(float(len(refs)))

  def vec(counts):
    v = [dict() for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for g, tf in counts.items():
      k = len(g) - 1
      w = float(tf) * (log_images - math.log(max(1.0, df[g])))
      v[k][g] = w
      norm[k] += w * w
      if k == 1:  # pycocoevalcap measures length in bigrams
        length += tf
    return v, [math.sqrt(x) for x in norm], length

  scores = []
  for hyp, counts in zip(hyps, ref_counts):
    vh, nh, lh = vec(_ngrams(hyp.split(), n))
    total = np.zeros(n)
    for c in counts:
      vr, nr, lr = vec(c)
      delta = float(lh - lr)
      for k in range(n):
        val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
        if nh[k] != 0 and nr[k] != 0:
          val /= nh[k] * nr[k]
        total[k] += val * math.exp(-(delta**2) / (2 * sigma**2))
    scores.append(float(np.mean(total)) / len(counts) * 10.0)
  return float(np.mean(scores))


def score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
  """BLEU-1..4, ROUGE-L and CIDEr-D of raw captions (tokenised here)."""
  hyps = [tokenize(p) for p in predictions]
  refs = [[tokenize(r) for r in rs] for rs in references]
  b = bleu(hyps, refs)
  out = {f"bleu{k + 1}": b[k] for k in range(4)}
  out["rouge_l"] = rouge_l(hyps, refs)
  out["cider"] = cider_d(hyps, refs)
  return out
