"""Tokenizers: a Hugging Face fast tokenizer from a local folder, or a small
byte-level BPE (GPT-2's algorithm) trained on the training captions, for
models trained from scratch on a small vocabulary.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline import atomic

END = "<|endoftext|>"  # GPT-2's one special token: BOS, EOS and padding.


def train_bpe(captions: Iterable[str], vocab_size: int, out_dir: str):
  """Trains a byte-level BPE on `captions` and saves it as an HF tokenizer."""
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(captions, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=END, eos_token=END,
                                 pad_token=END, unk_token=END)
  with atomic.folder(out_dir) as tmp:
    fast.save_pretrained(tmp)
  return fast


# Classes saved by `tokenizers`-backed tokenizers (capjax's BPE among them):
# loaded directly, what AutoTokenizer would pick, without its import of the
# model configs (and through them PyTorch, where installed: 2-3 s a process).
_PLAIN_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load(path: str):
  """The tokenizer saved in folder `path` (local, or in a bucket: fetched)."""
  from pipeline import fs
  if fs.is_bucket(path):
    path = fs.fetched(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no tokenizer folder")
  config = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(config):
    with open(config) as f:
      if json.load(f).get("tokenizer_class") in _PLAIN_FAST:
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(path)
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(path)


def special_ids(tok) -> tuple[int, int, int]:
  """(BOS, EOS, pad) ids; GPT-2 tokenizers pad with EOS, as the old recipe did."""
  eos = tok.eos_token_id
  bos = tok.bos_token_id if tok.bos_token_id is not None else eos
  pad = tok.pad_token_id if tok.pad_token_id is not None else eos
  return bos, eos, pad
