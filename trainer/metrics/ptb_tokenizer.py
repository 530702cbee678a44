"""The COCO caption evaluation's tokenization, in Python.

pycocoevalcap runs Stanford's PTBTokenizer (CoreNLP 3.4.1) over all captions
at once, one caption per line (`-preserveLines -lowerCase`), and then drops
the punctuation tokens in `PUNCTUATION`. This module gives the same tokens
without Java: a longest-match lexer whose rules follow that tokenizer's
(words, contractions split as `do n't`, abbreviations and acronyms, numbers,
URLs, quotes turned into `` and '', brackets into -lrb- and friends, dashes,
ellipses, currency signs, SGML tags), checked token for token against the jar's
own output (tests/data/ptb_tokens.json).

As in the Java run, a caption's last token can depend on the next caption: an
abbreviation such as `etc.` before a capital letter on the next line is read
as ending a sentence and followed by a `.` token. `tokenize_captions` takes the
captions in the order pycocoevalcap feeds them, so that context is the same.
"""

from __future__ import annotations

from typing import Sequence

import regex

from trainer.metrics.ptb_rules import ABBREVIATION, NEWLINE, RULES

# The tokens pycocoevalcap removes after tokenization. The bracket names are
# upper-case there, so the lower-cased -lrb- etc. stay, as they do there.
PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?",
                         "!", ",", ":", "-", "--", "...", ";"])


def _compile(main: str, trail: str | None):
  """The rule's longest match (trailing context required after it, not part
  of the token) and its trailing context's longest match."""
  flags = regex.I | regex.V0 | regex.POSIX
  if trail is None:
    return regex.compile(main, flags), None
  return regex.compile(f"(?:{main})(?={trail})", flags), regex.compile(trail, flags)


_COMPILED = [(*_compile(main, trail), action) for main, trail, action in RULES]
_NEWLINE_RE = regex.compile(NEWLINE)
_OTHER_NEWLINES = regex.compile(r"[\r\u2028\u2029\u000B\u000C\u0085]")
_ASSIMILATED = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])
# A plain ASCII word that ends at a space, a line end or the text's end: by far
# the commonest token, and no rule but the assimilations reads it differently.
_PLAIN = regex.compile(r"[A-Za-z]+(?=[ \n]|\Z)")
# The same followed by a comma, or by a period, and then a space or a line end.
# (not a period that starts a spaced ellipsis, ". . .")
_PLAIN_PUNCT = regex.compile(r"([A-Za-z]+)(,|\.(?! \.))(?=[ \n]|\Z)")
# Words that may read differently before a period (abbreviations, acronyms).
_ABBREVIATED = regex.compile(ABBREVIATION, regex.I | regex.V0)
# A space-separated piece of a plain caption: an ASCII word, number or
# hyphenated compound, maybe with 's or n't, maybe with a comma.
_CHUNK = regex.compile(r"([A-Za-z0-9]+(?:-[A-Za-z0-9]+)*)('[sS]|[nN]'[tT])?(,?)")
_END = regex.compile(r"(?:\.|[!?]+)\Z")
_LAST_WORD = regex.compile(r"[A-Za-z]+\Z")
_CHUNKS: dict[str, tuple[str, ...] | None] = {}


def _chunk(chunk: str) -> tuple[str, ...] | None:
  """The tokens of one piece, or None where its neighbours or rarer rules
  could change them."""
  m = _CHUNK.fullmatch(chunk)
  if m is None:
    return None if chunk != "," else (",",)
  word, clitic, punct = m.groups()
  letters = word.isalpha()
  if letters and word.lower() in _ASSIMILATED:
    return None
  if clitic:
    if not letters:
      return None
    if clitic[0] in "nN":  # do n't, ca n't: the word may not end in n
      if word[-1] in "nN":
        return None
      return (word.lower(), "n't") + ((punct,) if punct else ())
    return (word.lower(), clitic.lower()) + ((punct,) if punct else ())
  if "-" in word and not word.replace("-", "").isalpha():
    return None  # numbers with hyphens: dates, phone numbers
  return (word.lower(), punct) if punct else (word.lower(),)


def _context_end(text: str, pos: int) -> int:
  """Where the text that can decide a token at pos ends: the end of the next
  line that is not blank (trailing contexts look past line ends), or the
  whole text for an SGML tag, whose quoted values may span lines."""
  if text[pos] == "<":
    return len(text)
  end = text.find("\n", pos)
  while end >= 0:
    nxt = text.find("\n", end + 1)
    if nxt < 0:
      break
    if text[end + 1:nxt].strip():
      return nxt + 1
    end = nxt
  return len(text)


def _next_token(text: str, pos: int, end: int) -> tuple[list[str], int]:
  best, best_total = None, 0
  for main, trail, action in _COMPILED:
    m = main.match(text, pos, end)
    if m is None:
      continue
    total = m.end()
    if trail is not None:
      total = trail.match(text, total, end).end()
    if total > best_total:
      best, best_total = (m.end(), action), total
  if best is None:  # a character the tokenizer does not know is deleted
    return [], 1
  stop, action = best
  return action(text[pos:stop])


def lex(text: str, first_line: bool = False) -> list[str]:
  """The tokenizer's output lines for text (`-preserveLines -lowerCase`):
  tokens joined by single spaces, one output line per input line (only the
  first with first_line)."""
  lines, tokens = [], []
  pos, n = 0, len(text)
  while pos < n:
    ch = text[pos]
    if ch == " ":
      pos += 1
      continue
    nl = _NEWLINE_RE.match(text, pos)
    if nl is not None:
      lines.append(" ".join(tokens))
      if first_line:
        return lines
      tokens = []
      pos = nl.end()
      continue
    m = _PLAIN.match(text, pos)
    if m is not None and m.group().lower() not in _ASSIMILATED:
      tokens.append(m.group().lower())
      pos = m.end()
      continue
    m = _PLAIN_PUNCT.match(text, pos)
    if m is not None:
      word = m.group(1).lower()
      if word not in _ASSIMILATED and (m.group(2) == "," or
                                       not _ABBREVIATED.fullmatch(m.group(1))):
        tokens += [word, m.group(2)]
        pos = m.end()
        continue
    out, consumed = _next_token(text, pos, _context_end(text, pos))
    for t in out:
      # an SGML tag's quoted value may span lines; it is printed as it is
      first, *rest = t.lower().split("\n")
      tokens.append(first)
      for part in rest:
        lines.append(" ".join(tokens))
        tokens = [part]
    pos += consumed
  lines.append(" ".join(tokens))
  return lines[:1] if first_line else lines


def _simple(caption: str) -> list[str] | None:
  """The tokens of a caption of plain pieces (see _chunk) ending with at most
  one period or a run of ! and ?; None where the full lexer must decide."""
  body = caption.rstrip(" ")
  end = _END.search(body)
  if end is not None:
    body = body[:end.start()]
    word = _LAST_WORD.search(body) if end.group() == "." else None
    if word is not None and _ABBREVIATED.fullmatch(word.group()):
      return None
  words: list[str] = []
  digit_before = False
  for chunk in body.split(" "):
    if not chunk:
      continue
    if chunk not in _CHUNKS:
      _CHUNKS[chunk] = _chunk(chunk)
    tokens = _CHUNKS[chunk]
    if tokens is None or (digit_before and chunk[0].isdigit()):  # 555 1234: a phone number
      return None
    words.extend(tokens)
    digit_before = chunk[-1].isdigit()
  if end is not None:
    words.append(end.group())
  return words


def tokenize_captions(captions: Sequence[str]) -> list[str]:
  """What pycocoevalcap's PTBTokenizer returns for these captions, in this
  order: lower-cased tokens without punctuation, joined by single spaces."""
  texts = [c.replace("\n", " ") for c in captions]
  if any("<" in t or _OTHER_NEWLINES.search(t) for t in texts):
    # Tags may span captions, other line breaks shift them: lex them as one
    # text, as the Java run does.
    lines = lex("\n".join(texts))[:len(texts)]
  else:
    lines = []
    for i, t in enumerate(texts):
      words = _simple(t)
      if words is not None:
        lines.append(" ".join(words))
        continue
      # A caption's last token may depend on the next non-blank caption.
      j = i + 1
      while j < len(texts) and not texts[j].strip():
        j += 1
      lines.append(lex("\n".join(texts[i:j + 1]), first_line=True)[0])
  return [_unpunctuated(line) for line in lines]


def tokenize_each(captions: Sequence[str]) -> list[str]:
  """Each caption's tokens as pycocoevalcap gives them for that caption on
  its own: no caption's tokens depend on its neighbours (a `<` that opens
  a tag in one caption does not shift the lines of those after it), as a
  reward per caption needs."""
  out = []
  for c in captions:
    text = _OTHER_NEWLINES.sub(" ", c.replace("\n", " "))
    words = None if "<" in text else _simple(text)
    out.append(_unpunctuated(" ".join(words) if words is not None
                             else lex(text, first_line=True)[0]))
  return out


def _unpunctuated(line: str) -> str:
  return " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATION)
