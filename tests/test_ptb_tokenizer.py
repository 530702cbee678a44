"""The Python PTB tokenizer against the Java one pycocoevalcap runs."""

import json
import os
import random
import shutil

import pytest

from trainer.metrics import ptb_tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")
JAVA = shutil.which("java") is not None


def _rows(name):
  with open(os.path.join(DATA, name), encoding="utf-8") as f:
    return json.load(f)["rows"]


@pytest.mark.parametrize("name", ["ptb_tokens.json", "ptb_generated.json"])
def test_equal_to_the_java_tokenizer(name):
  """Committed output of the jar (tests/data/make_ptb_tokens.py): every
  string's tokenizer line and pycocoevalcap's tokens, all strings in one run."""
  rows = _rows(name)
  texts = [r["text"] for r in rows]
  lines = ptb_tokenizer.lex("\n".join(t.replace("\n", " ") for t in texts))
  assert [l.rstrip() for l in lines[:len(texts)]] == [r["lexer"] for r in rows]
  assert ptb_tokenizer.tokenize_captions(texts) == [r["tokens"] for r in rows]


def test_a_caption_end_depends_on_the_next_caption():
  # "I." before a capitalised "The" ends a sentence: the letter, then a period
  assert ptb_tokenizer.tokenize_captions(["The letter I.", "The end"])[0] == "the letter i"
  assert ptb_tokenizer.tokenize_captions(["The letter I.", "and more"])[0] == "the letter i."
  # and the same when captions go one by one through the plain-caption path
  assert ptb_tokenizer.tokenize_captions(["a b", "The letter I.", "", "The end"])[1] == \
      "the letter i"


def test_tags_spanning_captions_are_lexed_as_one_text():
  captions = ["a <a b='x", "y'> z", "after"]
  assert ptb_tokenizer.tokenize_captions(captions) == ["a <a\u00a0b='x", "y'> z", "after"]


@pytest.mark.skipif(not JAVA, reason="needs Java for pycocoevalcap's PTBTokenizer")
def test_equal_to_pycocoevalcap_on_generated_captions():
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  from tests.data.make_ptb_tokens import generated

  rng = random.Random(7)
  words = "A man's dog isn't on the 2nd floor, near 3 cats; e.g. Mr. Smith's U.S. car".split()
  captions = generated(1500, seed=11) + [
      " ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) + rng.choice(["", ".", "!"])
      for _ in range(1500)]
  want = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
  assert ptb_tokenizer.tokenize_captions(captions) == [want[i][0] for i in range(len(captions))]
