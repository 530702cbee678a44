"""Writes ptb_tokens.json: the COCO caption evaluation's tokenization of
ptb_corpus.json, the reference the metrics' tokenizer is tested against.

Needs Java and pycocoevalcap (whose jar holds Stanford's PTBTokenizer 3.4.1);
run once where they are, and commit the output:

  python tests/data/make_ptb_tokens.py

For each string: `lexer`, the tokenizer's own output line (`-preserveLines
-lowerCase`, as pycocoevalcap runs it), and `tokens`, what
pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer returns after removing its
punctuation tokens. All strings go through one call, as an evaluation's
captions do.
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  from pycocoevalcap.tokenizer import ptbtokenizer

  corpus = json.load(open(os.path.join(HERE, "ptb_corpus.json")))
  captions = {i: [{"caption": s}] for i, s in enumerate(corpus)}
  tokens = ptbtokenizer.PTBTokenizer().tokenize(captions)
  jar_dir = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
    f.write("\n".join(s.replace("\n", " ") for s in corpus))
  out = subprocess.run(["java", "-cp", os.path.join(jar_dir, ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR),
                        "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
                        f.name], capture_output=True, check=True).stdout.decode()
  os.unlink(f.name)
  lexer = out.split("\n")
  rows = [{"text": s, "lexer": lexer[i].rstrip(), "tokens": tokens[i][0]}
          for i, s in enumerate(corpus)]
  version = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
  json.dump({"java": version.splitlines()[0], "rows": rows},
            open(os.path.join(HERE, "ptb_tokens.json"), "w", encoding="utf-8"),
            ensure_ascii=False, indent=1)
  print(f"{len(rows)} strings", file=sys.stderr)


if __name__ == "__main__":
  main()
