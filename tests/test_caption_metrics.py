"""capjax's metrics against pycocoevalcap's own scorers (and its Java
tokenizer where Java is installed)."""

import contextlib
import io
import random
import shutil

import pytest

from trainer.metrics import caption_metrics

JAVA = shutil.which("java") is not None
WORDS = ("a the red blue small large circle square on of and to left right shape two man's "
         "isn't Dog DOG dogs, Mr. U.S. e.g. 3 1.5 well-known (big) \"quoted\" 'single' "
         "x-ray ... ! ? ; : -- café").split()


def _caption(rng, longest=15):
  return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, longest))) + \
      rng.choice(["", ".", " .", "!"])


def _set(seed):
  """One evaluation: 1-30 images, 1-6 references each; some predictions
  empty, very long or one word repeated, some references empty."""
  rng = random.Random(seed)
  preds, refs = [], []
  for _ in range(rng.randint(1, 30)):
    r = rng.random()
    if r < 0.08:
      preds.append("")
    elif r < 0.14:
      preds.append(_caption(rng, 300))
    elif r < 0.2:
      preds.append(" ".join([rng.choice(WORDS)] * rng.randint(2, 12)))
    else:
      preds.append(_caption(rng))
    refs.append([_caption(rng) if rng.random() > 0.03 else "" for _ in range(rng.randint(1, 6))])
  return preds, refs


def _reference_scores(hyps, refs):
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge

  gts = {i: r for i, r in enumerate(refs)}
  res = {i: [h] for i, h in enumerate(hyps)}
  with contextlib.redirect_stdout(io.StringIO()):
    b, _ = Bleu(4).compute_score(gts, res)
  r, _ = Rouge().compute_score(gts, res)
  c, _ = Cider().compute_score(gts, res)
  return {**{f"bleu{k + 1}": b[k] for k in range(4)}, "rouge_l": r, "cider": c}


@pytest.mark.parametrize("block", range(8))
def test_equal_to_pycocoevalcap_scorers(block):
  """200 generated sets (25 per block), tokenized once, scored by both."""
  for seed in range(block * 25, block * 25 + 25):
    preds, refs = _set(seed)
    hyps = caption_metrics.tokenize(preds)
    flat = caption_metrics.tokenize([r for rs in refs for r in rs])
    tok_refs, at = [], 0
    for rs in refs:
      tok_refs.append(flat[at:at + len(rs)])
      at += len(rs)
    want = _reference_scores(hyps, tok_refs)
    got = {f"bleu{k + 1}": v for k, v in enumerate(caption_metrics.bleu(hyps, tok_refs))}
    got["rouge_l"] = caption_metrics.rouge_l(hyps, tok_refs)
    got["cider"] = caption_metrics.cider_d(hyps, tok_refs)
    for k in want:
      assert got[k] == pytest.approx(want[k], abs=1e-9, rel=0), (seed, k)


@pytest.mark.skipif(not JAVA, reason="needs Java for pycocoevalcap's PTBTokenizer")
def test_score_equals_the_coco_evaluation_from_raw_captions():
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

  preds, refs = [], []
  for seed in range(1000, 1040):
    p, r = _set(seed)
    preds += p
    refs += r
  tok = PTBTokenizer()
  with contextlib.redirect_stdout(io.StringIO()):
    gts = tok.tokenize({i: [{"caption": c} for c in rs] for i, rs in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
  want = _reference_scores([res[i][0] for i in range(len(preds))],
                           [gts[i] for i in range(len(refs))])
  got = caption_metrics.score(preds, refs)
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-9, rel=0), k


def test_perfect_caption_scores_high():
  refs = [["a red circle on a plain background", "one red circle"],
          ["two blue squares", "a pair of blue squares"]]
  s = caption_metrics.score(["A red circle on a plain background.", "Two blue squares"], refs)
  assert s["bleu1"] == pytest.approx(1.0) and s["rouge_l"] > 0.6 and s["cider"] > 1.0


def test_an_image_without_references_is_an_error():
  with pytest.raises(ValueError, match="image 1 has no reference captions"):
    caption_metrics.score(["a", "b"], [["a"], []])
  with pytest.raises(ValueError, match="no captions to score"):
    caption_metrics.score([], [])


def test_rouge_score_metrics_by_hand():
  # "the cat sat" against "the cat sat on the mat": ROUGE-1 P 3/3, R 3/6;
  # ROUGE-2 P 2/2, R 2/5; Lsum (one sentence) as ROUGE-L, the LCS is 3 words
  s = caption_metrics.rouge_score_metrics(["the cat sat"], [["the cat sat on the mat", "dogs"]])
  assert s["rouge1"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)
  assert s["rouge2"] == pytest.approx(100 * 2 * 1 * 0.4 / 1.4)
  assert s["rouge_lsum"] == pytest.approx(s["rouge1"])


@pytest.mark.skipif(not JAVA, reason="METEOR runs pycocoevalcap's Java jar")
def test_meteor_through_the_jar():
  assert caption_metrics.meteor_available()
  preds = ["a man riding a wave on a surfboard", "two dogs in the snow"]
  refs = [["A man rides a wave on his surfboard."], ["Two dogs play in the snow."]]
  same = caption_metrics.meteor(preds, [[p] for p in preds])
  assert same == pytest.approx(1.0, abs=0.01)
  assert 0.2 < caption_metrics.meteor(preds, refs) < same


def test_as_an_evaluate_module_loaded_offline(tmp_path):
  """`evaluate.load` of the module folder: no hub, the same numbers."""
  import json
  import os
  import subprocess
  import sys

  code = ("import json, evaluate, trainer.metrics.coco_caption\n"
          "m = evaluate.load(trainer.metrics.coco_caption.PATH)\n"
          "print(json.dumps(m.compute(predictions=['A dog runs.', 'two cats'], "
          "references=[['a dog running', 'A brown dog runs!'], ['Two cats sleep.']])))\n")
  env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
         "HF_DATASETS_OFFLINE": "1"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
  got = json.loads(out.strip().splitlines()[-1])
  want = caption_metrics.score(["A dog runs.", "two cats"],
                               [["a dog running", "A brown dog runs!"], ["Two cats sleep."]])
  assert got == pytest.approx(want, abs=1e-12)
