"""Writes the COCO caption evaluation's tokenization of test strings, the
reference the metrics' tokenizer is tested against:

  ptb_tokens.json      ptb_corpus.json: hand-picked tricky captions
  ptb_generated.json   3,000 generated strings: caption-like text with
                       abbreviations, numbers and punctuation, and short runs
                       of punctuation-heavy characters

Needs Java and pycocoevalcap (whose jar holds Stanford's PTBTokenizer 3.4.1);
run once where they are, and commit the output:

  python tests/data/make_ptb_tokens.py

For each string: `lexer`, the tokenizer's own output line (`-preserveLines
-lowerCase`, as pycocoevalcap runs it), and `tokens`, what
pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer returns after removing its
punctuation tokens. All strings of a file go through one call, in order, as an
evaluation's captions do.
"""

import json
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

WORDS = ("a man woman dog cat sitting on the of in with and is are two three red blue street "
         "table pizza bus train giraffe standing next to near plate food people group large small "
         "white black it he she they this that there what who when".split())
ABBREVIATIONS = (
    "Jan Feb Sep Sept Oct Dec Mon Tues Fri Ala Ark ark Az Calif Ct Del del Ill ill Kans Ky La la "
    "Mass mass Miss miss Mo Ore ore Pa pa Tex tex Va Wash wash Wisc Inc Co Cos Corp Pty Ltd Plc Rt "
    "Bhd Univ tel est sq Jr Sr Bros Ph.D Blvd Rd etc al seq Bldg Mr Mrs Ms Mx Dr Prof Sen Rep Gen "
    "Rev Sgt Capt St Ave Hon Mt Ft Asst Mme vs v V Alex cf Ph Natl Mfg Dept ca fig figs prop no nos "
    "sec art arts pp op approx Pt rs So No p P U.S U.K a.m p.m e.g i.e A B I Z x".split())
PIECES = [".", ",", ";", ":", "!", "?", "...", "'", '"', "`", "''", "``", "(", ")", "[", "]", "{",
          "}", "-", "--", "\u2014", "\u2013", "&", "$", "%", "#", "@", "*", "/", "\u2019", "\u2018",
          "\u201c", "\u201d", "'s", "n't", "'re", "'ll", "'m", "'d", "'ve", "\u2026", "<", ">", "=",
          "+", "_", "~", "^", "\u00a3", "\u20ac", "\u00b0", "\U0001F600", "\u00e9", "\u00a0", "\t",
          "&amp;", "&quot;", ":)", "^_^", "<b>", "</b>"]
CHARS = ("aAbBsStTnNdDlLmMiIeEoOyY0123456789 .,;:!?'\"`()[]{}-_&$%#@*/\\+=<>~^|\u2019\u2018"
         "\u201c\u201d\u2014\u2013\u2026\u00a3\u00e9\u00a0\u00bd\u00bc\u00be\u2153\u2154\u215b"
         "\u00ab\u00bb\u2039\u203a\u201e\u201a\u201b\u00ad\u00a2\u00a5\u20ac\u00b2\u00b0\u00d7"
         "\u2022\u00b7\u3000\u2009\u00c9\u00df")


def _caption(rng):
  out = []
  for _ in range(rng.randint(1, 14)):
    r = rng.random()
    if r < 0.6:
      w = rng.choice(WORDS)
      w = w.capitalize() if rng.random() < 0.2 else w.upper() if rng.random() < 0.03 else w
    elif r < 0.7:
      w = rng.choice(ABBREVIATIONS) + rng.choice([".", ".", "", ". "])
    elif r < 0.8:
      w = str(rng.choice([rng.randint(0, 99), rng.randint(100, 99999), round(rng.random() * 100, 2)]))
    else:
      w = rng.choice(PIECES)
    out.append(w + rng.choice([" ", " ", " ", " ", "", "  "]))
  s = "".join(out)
  if rng.random() < 0.5:
    s = s.rstrip() + rng.choice([".", ".", "", " .", "!", "..."])
  return s


def generated(n=3000, seed=0):
  rng = random.Random(seed)
  return [_caption(rng) if rng.random() < 0.7 else
          "".join(rng.choice(CHARS) for _ in range(rng.randint(1, 16))) for _ in range(n)]


def reference(corpus):
  from pycocoevalcap.tokenizer import ptbtokenizer

  tokens = ptbtokenizer.PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(corpus)})
  jar_dir = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
    f.write("\n".join(s.replace("\n", " ") for s in corpus))
  out = subprocess.run(["java", "-cp", os.path.join(jar_dir, ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR),
                        "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
                        f.name], capture_output=True, check=True).stdout.decode()
  os.unlink(f.name)
  lexer = out.split("\n")
  version = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
  return {"java": version.splitlines()[0],
          "rows": [{"text": s, "lexer": lexer[i].rstrip(), "tokens": tokens[i][0]}
                   for i, s in enumerate(corpus)]}


def main():
  corpus = json.load(open(os.path.join(HERE, "ptb_corpus.json")))
  for name, strings in (("ptb_tokens.json", corpus), ("ptb_generated.json", generated())):
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
      json.dump(reference(strings), f, ensure_ascii=False, indent=0)
    print(f"{name}: {len(strings)} strings", file=sys.stderr)


if __name__ == "__main__":
  main()
