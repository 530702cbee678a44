"""The token rules of Stanford's PTBTokenizer as CoreNLP 3.4.1 applies them
(the version inside pycocoevalcap), for `trainer.metrics.ptb_tokenizer`.

Each rule is a regular expression for the token, an optional trailing context
that must follow it (and counts towards the match length, but is not part of
the token), and an action that turns the matched text into tokens. The lexer
takes the longest match, and of equally long ones the earliest rule. Options
are those pycocoevalcap runs with: brackets to -LRB- etc., quotes to `` and '',
dashes to --, ellipses to ..., currency signs to $ and #, spaces inside
tokens to U+00A0, contractions and "cannot", "gonna"... split.
"""

from __future__ import annotations

from typing import Callable

import regex

# --- character classes and building blocks (JFlex %caseless: literals ignore
# case, character classes do not; (?-i:...) marks the case-sensitive ones) ---
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_NEWLINE = r"(?:\r\n|[\r\n\u2028\u2029\u000B\u000C\u0085])"
_SPACENL = rf"(?:{_SPACE}|{_NEWLINE})"
_UPPER = r"(?-i:\p{Lu})"
_LETTER_EXTRA = (r"\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F"
                 r"\u0370-\u037D\u0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF"
                 r"\u04F6-\u04FF\u0510-\u0525\u055A-\u055F\u0591-\u05BD\u05BF\u05C1\u05C2"
                 r"\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F\u064B-\u065E\u0670\u06D6-\u06EF"
                 r"\u06FA-\u06FF\u070F\u0711\u0730-\u074F\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5"
                 r"\u07FA\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955\u0962-\u0963\u0981-\u0983"
                 r"\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03\u0A3C"
                 r"\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8"
                 r"\u0BCA-\u0BCD\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A"
                 r"\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD")
_SPLET = r"&[aeiouAEIOU](?:acute|grave|uml);"
_LETTER = rf"(?:\p{{L}}|{_SPLET}|[{_LETTER_EXTRA}])"
_DIGIT = r"\p{Nd}"
_ALNUM = r"[\p{L}\p{Nd}]"
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = rf"(?:{_APOS}|[`\u0091\u2018\u201B])"
_SGML = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
         r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.\-]*)"
         r"[ ]*>")
_SENTEND = rf"{_SPACENL}(?:{_SPACENL}|{_UPPER}|{_SGML})"
_NUM = rf"{_DIGIT}+|{_DIGIT}*(?:[.:,\u00AD\u066B\u066C]{_DIGIT}+)+"
_NUMBER = rf"[\-+]?(?:{_NUM})"
_HYPHEN = r"[\-_\u058A\u2010\u2011]"
_WORD = (rf"{_LETTER}(?:{_LETTER}|{_DIGIT})*(?:[.!?]{_LETTER}(?:{_LETTER}|{_DIGIT})*)*")
_REDAUX = rf"{_APOS}(?:[msd]|re|ve|ll)"
_SWORD = r"[A-Za-z\u00AD]*(?-i:[A-MO-Za-mo-z])\u00AD*"
_SREDAUX = rf"n{_APOSETC}t"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])*|(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R)"
_ACRO2 = r"[A-Za-z](?:\.[A-Za-z])+|(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R)"
_ABBREV1 = ("(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"  # months
            "|Mon|Tue|Tues|Wed|Thu|Thurs|Fri"  # days
            "|Ala|Ariz|(?-i:A)z|(?-i:A)rk|Calif|Colo|Conn|Ct|Dak|(?-i:D)el|Fla|Ga|(?-i:I)ll|Ind|Kans?|Ky"
            "|(?-i:L)a|(?-i:M)ass|Md|Mich|Minn|(?-i:M)iss|Mo|Mont|Neb|Nev|Okla|(?-i:O)re|(?-i:P)a"
            "|Penn|Tenn|(?-i:T)ex|Va|Vt|(?-i:W)ash|Wisc?|Wyo"  # states
            "|Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys"  # companies
            "|tel|est|ext|sq|Jr|Sr|Bros|(?:Ed|Ph)\\.D|Blvd|Rd|Esq|etc|al|seq|Bldg)\\.")
_ABTITLE = ("Mr|Mrs|Ms|(?-i:M)iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev"
            "|Maj|Sgt|Cpl|Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft"
            "|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc")
_ABBREV4 = (rf"(?:{_ABTITLE}|vs|(?-i:v)|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|{_ACRO}"
            r"|Invt|Elec|Natl|M[ft]g|Dept)")
_ABBREV3 = r"(?:ca|figs?|prop|nos?|art|bldg|pp|op)\."
_ACRONYM_NEXT = ("About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here"
                 "|However|If|In|It|Last|Many|More|Mr\\.|Ms\\.|Now|Once|One|Other|Our|She"
                 "|Since|So|Some|Such|That|The|Their|Then|There|These|They|This|We|When|While"
                 "|What|Yet|You")
# the first letter of each following word is case-sensitive; or a tag follows
_ACRONYM_NEXT = "|".join([*(f"(?-i:{w[0]}){w[1:]}" for w in _ACRONYM_NEXT.split("|")), _SGML])
_PHONE = (r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])"
          r"[0-9]{3,4}[\- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}")
_APOWORD = (rf"{_APOS}n{_APOS}?|[lLdDjJ]{_APOS}|Dunkin{_APOS}|somethin{_APOS}|ol{_APOS}|{_APOS}em"
            rf"|(?-i:[A-HJ-XZn]){_APOSETC}\p{{L}}{{2}}\p{{L}}*|{_APOS}[2-9]0s|{_APOS}till?"
            rf"|\p{{L}}+(?-i:[aeiouyAEIOUY]){_APOSETC}(?-i:[aeiouA-Z])\p{{L}}*|{_APOS}cause"
            rf"|cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|O{_APOSETC}o")
_FILENAME_EXT = ("bat|bmp|bz2|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg"
                 "|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip")
_QUOTES = (rf"{_APOS}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E"
           r"\u201F\u2039\u203A\u00AB\u00BB]{1,2}")
_MISCSYMBOL = (r"[+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7"
               r"\u00F7\u0387\u05BE\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C"
               r"\u0614\u061B\u061E\u066A\u066D\u0703-\u070D\u07F6\u07F7\u07F8\u0964\u0965\u0E4F"
               r"\u1FBD\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F"
               r"\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F"
               r"\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")


def _latex_quotes(tok: str, left: bool) -> str:
  tok = regex.sub(r"&apos;|'", "`" if left else "'", tok)
  tok = regex.sub(r"\"|&quot;", "``" if left else "''", tok)
  tok = regex.sub("[\u0091\u2018\u201B\u2039]", "`", tok)
  tok = regex.sub("[\u0092\u2019\u203A]", "'", tok)
  tok = regex.sub("[\u0093\u201C\u00AB]", "``", tok)
  return regex.sub("[\u0094\u201D\u00BB]", "''", tok)


def _brackets(tok: str) -> str:
  return tok.replace("(", "-LRB-").replace(")", "-RRB-")


def _currency(tok: str) -> str:
  tok = tok.replace("\u00A2", "cents").replace("\u00A3", "#")
  return regex.sub("[\u0080\u00A4\u20A0\u20AC]", "$", tok)


_FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}

# An action gets the matched text and returns (tokens, characters consumed).
Action = Callable[[str], "tuple[list[str], int]"]


def _keep(t):
  return [t], len(t)


def _as(fn):
  return lambda t: ([fn(t)], len(t))


def _drop(t):
  return [], len(t)


def _push_back(n):
  """Return all but the last n characters now; they are lexed again."""
  return lambda t: ([t[:-n]], len(t) - n)


def _with_period_again(t):
  """`etc.` before a sentence end: the token keeps its period and the period
  is read once more as its own token."""
  return [t], len(t) - 1


def _acronym(t):
  if len(t) == 2:  # "I." before "The": the letter, then the period
    return [t[0]], 1
  return [t], len(t) - 1


def _hyphens(t):
  return (["--"] if 3 <= len(t) <= 4 else [t]), len(t)


def _no_soft_hyphens(t):
  """Soft hyphens (U+00AD) only mark where a word may break; a token of
  nothing else is a hyphen."""
  return t.replace("\u00AD", "") or "-"


def _nbsp(t):
  return t.replace(" ", "\u00A0")


# (main pattern, trailing context or None, action), in the tokenizer's rule
# order: the longest match wins (trailing context counted), then the earliest.
RULES: list[tuple[str, str | None, Action]] = [
    (r"c\+\+|[cf]#", None, _keep),
    (r"cannot|'twas", None, _push_back(3)),
    (rf"{_APOS}tis|gonna|gotta|lemme|gimme|wanna", None, _push_back(2)),
    (_SGML, None, _as(lambda t: t.replace(" ", "\u00A0"))),
    (r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, _as(lambda t: "--")),
    (r"&amp;", None, _as(lambda t: "&")),
    (r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", None, _keep),
    (_WORD, _REDAUX, _as(_no_soft_hyphens)),
    (_SWORD, _SREDAUX, _as(_no_soft_hyphens)),
    (_WORD, None, _as(_no_soft_hyphens)),
    (_APOWORD, None, _keep),
    (rf"y{_APOS}", r"\p{L}", _keep),
    (r"https?://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-]", None, _keep),
    (r"(?:(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
     r"|(?:(?:(?-i:[^ \t\n\f\r\"`'<>|.!?(){},-_$])+\.)+(?:com|net|org|edu)))"
     r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?", None, _keep),
    (r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00A0]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
     r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&gt;|>)?", None, _keep),
    (rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{_LETTER}+", None, _keep),
    (_REDAUX, r"[^A-Za-z]", _as(lambda t: _latex_quotes(t, False))),
    (_SREDAUX, None, _as(lambda t: _latex_quotes(t, False))),
    (rf"{_DIGIT}{{1,2}}[\-/]{_DIGIT}{{1,2}}[\-/]{_DIGIT}{{2,4}}", None, _keep),
    (_NUMBER, None, _as(_no_soft_hyphens)),
    (r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)",
     None, _keep),
    (rf"(?:{_DIGIT}{{1,4}}[\- \u00A0])?{_DIGIT}{{1,4}}(?:\\?/|\u2044){_DIGIT}{{1,4}}", None,
     _as(_nbsp)),
    (r"[\u00BC\u00BD\u00BE\u2153-\u215E]", None, _as(lambda t: _FRACTIONS.get(t, t))),
    (rf"-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls"
     rf"|Cap{_APOS}n|c{_APOS}est", None, _as(lambda t: regex.sub("(?i)&amp;", "&", t))),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", None, _keep),
    (r"(?-i:[A-Z])*\$|#", None, _keep),
    (r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]",
     None, _as(_currency)),
    (rf"(?:{_ACRO})\.", rf"{_SPACENL}+(?:{_ACRONYM_NEXT}){_SPACENL}", _acronym),
    (_ABBREV3, rf"{_SPACENL}?{_DIGIT}", _keep),
    (r"(?:pt[ey]|co)\.", rf"{_SPACE}(?:ltd|lim)", _keep),
    (_ABBREV1, _SENTEND, _with_period_again),
    (_ABBREV1, r"(?s:..)", _keep),
    (_ABBREV1, None, _with_period_again),
    (rf"{_ABBREV4}\.", None, _keep),
    (_ABBREV4, _SPACE, _keep),
    (_ACRO, _SPACENL, _keep),
    (rf"{_APOS}[0-9][0-9]", _SPACENL, _keep),
    (rf"[\p{{L}}\p{{Nd}}]+(?:[\-._/][\p{{L}}\p{{Nd}}]+)*\.(?:{_FILENAME_EXT})",
     rf"(?:{_SPACENL}|[.?!,\"'<])", _keep),
    (rf"{_WORD}\.", r"[,;:\u3001]", _as(_no_soft_hyphens)),
    (_PHONE, None, _as(lambda t: _brackets(_nbsp(t)))),
    (r"\"|&quot;", r"[A-Za-z0-9$]", _as(lambda t: _latex_quotes(t, True))),
    (r"\"|&quot;", None, _as(lambda t: _latex_quotes(t, False))),
    (r"\x7F", None, _drop),
    (r"<|&lt;", None, _as(lambda t: "<")),
    (r">|&gt;", None, _as(lambda t: ">")),
    (r"(?-i:[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]])", r"[^A-Za-z0-9]", _as(_brackets)),
    (r"(?-i:[\^x=~<>]\.\[\^x=~<>]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
     r"|\([\^x=~<>']-[\^x=~<>'`]\))", None, _as(_brackets)),
    (r"\{", None, _as(lambda t: "-LCB-")),
    (r"\}", None, _as(lambda t: "-RCB-")),
    (r"\[", None, _as(lambda t: "-LSB-")),
    (r"\]", None, _as(lambda t: "-RSB-")),
    (r"\(", None, _as(lambda t: "-LRB-")),
    (r"\)", None, _as(lambda t: "-RRB-")),
    (r"-+", None, _hyphens),
    (r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", None, _as(lambda t: "...")),
    (r"@+|#+|_+", None, _keep),
    (r"\*+|(?:\\\*){1,3}", None, _keep),
    (r"[,;:\u3001]", None, _keep),
    (r"[?!]+", None, _keep),
    (r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", None, _keep),
    (r"=", None, _keep),
    (r"/", None, _keep),
    (rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|(?:{_ACRO2})\.))+\.",
     r"[,;:\u3001]", _as(_no_soft_hyphens)),
    (rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|(?:{_ACRO2})\.))+", None,
     _as(_no_soft_hyphens)),
    (rf"(?:[dDoOlL]{_APOSETC}{_ALNUM})?{_ALNUM}+(?:{_HYPHEN}(?:[dDoOlL]{_APOSETC}{_ALNUM})?"
     rf"{_ALNUM}+)*\.", r"[,;:\u3001]", _keep),
    (rf"(?:[dDoOlL]{_APOSETC}{_ALNUM})?{_ALNUM}+(?:{_HYPHEN}(?:[dDoOlL]{_APOSETC}{_ALNUM})?"
     rf"{_ALNUM}+)*", None, _keep),
    (r"(?-i:[A-Z])+(?:(?:[+&]|&amp;)(?-i:[A-Z])+)+\.", r"[,;:\u3001]",
     _as(lambda t: regex.sub("(?i)&amp;", "&", t))),
    (r"(?-i:[A-Z])+(?:(?:[+&]|&amp;)(?-i:[A-Z])+)+", None,
     _as(lambda t: regex.sub("(?i)&amp;", "&", t))),
    (r"'", r"[A-Za-z][^ \t\n\r\u00A0]", _as(lambda t: _latex_quotes(t, True))),
    (_REDAUX, None, _as(lambda t: _latex_quotes(t, False))),
    (_QUOTES, None, _as(lambda t: _latex_quotes(t, False))),
    (r"<<|>>", None, _keep),
    (_MISCSYMBOL, None, _keep),
    (rf"\x00|{_SPACE}+|[\u200B\u200E\u200F\uFEFF]", None, _drop),
    (r"&nbsp;", None, _drop),
]

# Words that may be read differently before a period (abbreviations, acronyms).
ABBREVIATION = rf"{_ABBREV1[:-2]}|{_ABBREV4}|{_ABBREV3[:-2]}|pt[ey]|co"
NEWLINE = _NEWLINE
