"""capjax's metrics against pycocoevalcap's own pure-Python scorers."""

import contextlib
import io

import numpy as np
import pytest

from trainer import caption_metrics

WORDS = "a the red blue small large circle square on of and to left right shape two".split()


def _sets(seed, n):
  rng = np.random.default_rng(seed)
  hyps, refs = [], []
  for _ in range(n):
    hyps.append(" ".join(rng.choice(WORDS, rng.integers(1, 15))))
    refs.append([" ".join(rng.choice(WORDS, rng.integers(1, 15)))
                 for _ in range(rng.integers(1, 6))])
  return hyps, refs


@pytest.mark.parametrize("seed", range(5))
def test_equal_to_pycocoevalcap(seed):
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge

  hyps, refs = _sets(seed, 60)
  gts = {i: r for i, r in enumerate(refs)}
  res = {i: [h] for i, h in enumerate(hyps)}
  with contextlib.redirect_stdout(io.StringIO()):
    ref_bleu, _ = Bleu(4).compute_score(gts, res)
  ref_rouge, _ = Rouge().compute_score(gts, res)
  ref_cider, _ = Cider().compute_score(gts, res)
  np.testing.assert_allclose(caption_metrics.bleu(hyps, refs), ref_bleu, rtol=0, atol=1e-12)
  assert caption_metrics.rouge_l(hyps, refs) == pytest.approx(ref_rouge, abs=1e-12)
  assert caption_metrics.cider_d(hyps, refs) == pytest.approx(ref_cider, abs=1e-12)


def test_tokenize_lowercases_and_drops_punctuation():
  assert caption_metrics.tokenize("A Red circle, on the LEFT.") == "a red circle on the left"
  assert caption_metrics.tokenize("three shapes : a cat") == "three shapes a cat"


def test_perfect_caption_scores_high():
  refs = [["a red circle on a plain background", "one red circle"],
          ["two blue squares", "a pair of blue squares"]]
  s = caption_metrics.score(["a red circle on a plain background", "two blue squares"], refs)
  assert s["bleu1"] == pytest.approx(1.0) and s["rouge_l"] > 0.6 and s["cider"] > 1.0
