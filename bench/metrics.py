"""Caption metrics: capjax against pycocoevalcap (the COCO caption evaluation)
on the same captions, in the same run.

5,000 images x 5 reference captions and one prediction each, COCO-like
(capitalised, commas, final periods, some contractions and numbers), made from
a fixed seed. Both sides tokenise (pycocoevalcap with its Java PTBTokenizer)
and compute BLEU-1..4, ROUGE-L and CIDEr-D; the figures must agree.

  python bench/metrics.py [--images N] [--refs K]

The last line is one JSON object with the figures and
speedup_vs_pycocoevalcap (pycocoevalcap's time over capjax's, tokenisation
included).
"""

import argparse
import contextlib
import io
import json
import random
import shutil
import sys
import time

SUBJECTS = ["A man", "A woman", "Two dogs", "A group of people", "A cat", "A young boy",
            "An elephant", "A red double decker bus", "The giraffe", "A plate of food", "Some kids",
            "A baseball player", "A small child", "Three zebras", "A person's hand"]
VERBS = ["sitting on", "standing next to", "riding", "walking down", "eating", "holding",
         "looking at", "laying on top of", "playing with", "is flying over", "isn't near",
         "parked beside", "swinging at", "grazing in"]
OBJECTS = ["a bench", "the street", "a surfboard", "a wave", "a wooden table", "a frisbee",
           "the snow", "a pizza", "a laptop computer", "a tall tree", "2 slices of cake",
           "an open field", "a busy city street", "the kitchen counter", "a red and white sign"]
TAILS = ["", " in a field", " near the water", ", with trees behind it", " on a sunny day",
         " at night", " while it rains", ", next to a fence", " in front of a building"]


def caption(rng: random.Random) -> str:
  s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}"
  s += rng.choice([".", ".", "", " .", "!"])
  return s.lower() if rng.random() < 0.3 else s


def data(images: int, refs: int, seed: int = 0):
  rng = random.Random(seed)
  references = [[caption(rng) for _ in range(refs)] for _ in range(images)]
  predictions = [caption(rng) for _ in range(images)]
  return predictions, references


def capjax_scores(predictions, references):
  from trainer.metrics import caption_metrics, ptb_tokenizer
  ptb_tokenizer._CHUNKS.clear()  # timed cold: no pieces remembered from an earlier round
  return caption_metrics.score(predictions, references)


def coco_scores(predictions, references):
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

  gts = {i: [{"caption": c} for c in rs] for i, rs in enumerate(references)}
  res = {i: [{"caption": p}] for i, p in enumerate(predictions)}
  with contextlib.redirect_stdout(io.StringIO()):
    tok = PTBTokenizer()
    gts, res = tok.tokenize(gts), tok.tokenize(res)
    b, _ = Bleu(4).compute_score(gts, res)
    r, _ = Rouge().compute_score(gts, res)
    c, _ = Cider().compute_score(gts, res)
  return {"bleu1": b[0], "bleu2": b[1], "bleu3": b[2], "bleu4": b[3], "rouge_l": r, "cider": c}


def timed(fns, *args, rounds=3):
  """The fastest of `rounds` runs of each function, the functions taking
  turns (this machine's speed drifts), and each one's result."""
  best, out = [float("inf")] * len(fns), [None] * len(fns)
  for _ in range(rounds):
    for i, fn in enumerate(fns):
      t = time.perf_counter()
      out[i] = fn(*args)
      best[i] = min(best[i], time.perf_counter() - t)
  return best, out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--images", type=int, default=5000)
  ap.add_argument("--refs", type=int, default=5)
  ap.add_argument("--rounds", type=int, default=3, help="keep the fastest of this many runs")
  args = ap.parse_args()
  if shutil.which("java") is None:
    sys.exit("bench/metrics.py: pycocoevalcap's tokenizer needs Java, and `java` is not on PATH")
  predictions, references = data(args.images, args.refs)
  (t_coco, t_ours), (coco, ours) = timed([coco_scores, capjax_scores], predictions, references,
                                         rounds=args.rounds)
  worst = max(abs(ours[k] - coco[k]) for k in coco)
  for k in coco:
    print(f"{k:8s} capjax {ours[k]:.12f}  pycocoevalcap {coco[k]:.12f}")
  print(f"pycocoevalcap {t_coco:.3f} s, capjax {t_ours:.3f} s "
        f"({args.images} images x {args.refs} references, tokenisation included)")
  print(json.dumps({"images": args.images, "references_per_image": args.refs,
                    "capjax_s": round(t_ours, 4), "pycocoevalcap_s": round(t_coco, 4),
                    "max_abs_difference": worst,
                    "speedup_vs_pycocoevalcap": round(t_coco / t_ours, 2)}))
  if worst > 1e-9:
    sys.exit(f"bench/metrics.py: capjax and pycocoevalcap differ by {worst:.3g}")


if __name__ == "__main__":
  main()
