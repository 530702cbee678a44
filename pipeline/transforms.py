"""Per-example work for training: images decoded and resized (images.py)
into batches with their tokenized captions.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import grain
import numpy as np

from pipeline import tokenizer as tokenizer_lib
from pipeline.images import BadImage, decode_and_resize


def _token_ids(tok, captions: Sequence[str]) -> list[list[int]]:
  backend = getattr(tok, "backend_tokenizer", None)
  if backend is not None and backend.truncation is None and backend.padding is None:
    # The Rust tokenizer directly: what the wrapper's call returns, at a
    # fraction of its Python overhead (which shows at hundreds of images/s).
    return [backend.encode(c, add_special_tokens=False).ids for c in captions]
  return tok(list(captions), add_special_tokens=False)["input_ids"]


def prompt_tokens(tok, prompt: str) -> list[int]:
  """A prompt's tokens (`model.prompt`), which captions are trained and
  decoded after; none for no prompt."""
  return _token_ids(tok, [prompt])[0] if prompt else []


def start_tokens(tok, model_cfg, bos: int) -> tuple[int, ...]:
  """What decoding starts from: [BOS] and the tokens of `model.prompt`,
  which the captions continue and leave out."""
  return (bos, *prompt_tokens(tok, model_cfg.get("prompt", "")))


def tokenize_captions(tok, captions: Sequence[str], max_length: int,
                      special: tuple[int, int, int] | None = None,
                      prompt: Sequence[int] = ()) -> dict[str, np.ndarray]:
  """Decoder inputs, labels and loss mask, each [len(captions), max_length].

  inputs = [BOS] + prompt + tokens, labels = prompt + tokens + [EOS],
  truncated and padded; the prompt's labels carry no loss (as BLIP trains).
  `special`: the model's (BOS, EOS, pad) ids; the tokenizer's by default.
  """
  ids = _token_ids(tok, captions)
  bos, eos, pad = special or tokenizer_lib.special_ids(tok)
  prompt = list(prompt)
  n = len(captions)
  inputs = np.full((n, max_length), pad, np.int32)
  labels = np.full((n, max_length), pad, np.int32)
  mask = np.zeros((n, max_length), np.float32)
  for i, t in enumerate(ids):
    seq = ([bos] + prompt + t)[:max_length]
    lab = (prompt + t + [eos])[:max_length]
    inputs[i, :len(seq)] = seq
    labels[i, :len(lab)] = lab
    mask[i, len(prompt):len(lab)] = 1.0
  return {"input_ids": inputs, "labels": labels, "loss_mask": mask}


class TrainBatch(grain.transforms.Map):
  """`[(g, record), ...]` to a training batch: images [n, S, S, 3] uint8,
  `captions_per_image` tokenized captions each ([n, k, L]), `skipped` [n].

  An example's randomness comes from (`seed`, g), g its place in the global
  stream, so it is the same however the work is split. An image with more
  captions gets a random subset each time it is seen; one with fewer repeats
  them with a zero loss mask, so every caption weighs the same. A record that
  cannot be used stops the run (`bad_records="fail"`, an error naming it) or
  (`"skip"`) becomes a blank example with a zero loss mask and `skipped` = 1,
  so batches keep their shape and the count reaches the run's metrics.
  Images are decoded straight into the batch, captions tokenized together.
  """

  def __init__(self, image_size: int, tokenizer_dir: str, max_length: int,
               captions_per_image: int, resize: str = "crop", resample: str = "auto",
               special: tuple[int, int, int] | None = None, crop_scale: float = 0.0,
               bad_records: str = "skip", seed: int = 0, crop_fraction: float = 1.0,
               prompt: str = ""):
    if bad_records not in ("skip", "fail"):
      raise ValueError(f"data.bad_records: {bad_records!r} is not skip or fail")
    self.image_size = image_size
    self.special = special
    self.prompt = prompt
    self.tokenizer_dir = tokenizer_dir
    self.max_length = max_length
    self.captions_per_image = captions_per_image
    self.resize = resize
    self.resample = resample
    self.crop_scale = crop_scale
    self.crop_fraction = crop_fraction
    self.bad_records = bad_records
    self.seed = seed
    self._tok = None
    self._lock = threading.Lock()
    self._reported = 0

  @classmethod
  def from_config(cls, cfg, tokenizer_dir: str, random_crops: bool = True) -> "TrainBatch":
    """As a run's config (`data`, the decoder's special ids, `seed`) asks."""
    d, dec = cfg.data, cfg.model.decoder
    return cls(d.image_size, tokenizer_dir, d.max_length, d.captions_per_image, d.resize,
               d.resample, (dec.bos_token_id, dec.eos_token_id, dec.pad_token_id),
               d.crop_scale if random_crops else 0.0, d.bad_records, cfg.seed,
               d.get("crop_fraction", 1.0), cfg.model.get("prompt", ""))

  def __getstate__(self):
    return {**self.__dict__, "_tok": None, "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def _tokenizer(self):
    # Grain may call from several threads at once; transformers' lazy imports
    # are not safe to race.
    with self._lock:
      if self._tok is None:
        self._tok = tokenizer_lib.load(self.tokenizer_dir)
    return self._tok

  def _captions(self, record: dict[str, Any], rng: np.random.Generator,
                image: np.ndarray) -> list[str] | None:
    """Decodes the record's image into `image`; its chosen captions, or None
    for a record skipped."""
    caps = record["captions"]
    try:
      if record.get("error"):
        raise BadImage(record["error"])
      if not caps:
        raise BadImage("no captions")
      decode_and_resize(record["image"], self.image_size, self.resize, self.resample, rng,
                        self.crop_scale, out=image, crop_fraction=self.crop_fraction)
    except BadImage as e:
      where = f"record {record.get('id')!r}" + (f" ({record['path']})" if "path" in record else "")
      if self.bad_records == "fail":
        raise BadImage(f"{where}: {e} (data.bad_records=fail)") from None
      if self._reported < 5:  # the first few reasons; the count goes to the metrics
        logging.warning("skipping %s: %s", where, e)
        self._reported += 1
      image[:] = 0
      return None
    order = rng.permutation(len(caps))
    return [caps[order[i % len(caps)]] for i in range(self.captions_per_image)]

  def map(self, elements: Sequence[tuple[int, dict[str, Any]]],
          images: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The batch; its images decoded into `images` [n, S, S, 3] if given."""
    n, k, size = len(elements), self.captions_per_image, self.image_size
    if images is None:
      images = np.empty((n, size, size, 3), np.uint8)
    skipped = np.zeros((n,), np.int32)
    used = np.zeros((n,), np.int64)  # captions that carry loss, per example
    texts: list[str] = []
    for i, (g, record) in enumerate(elements):
      chosen = self._captions(record, np.random.default_rng((self.seed, g)), images[i])
      if chosen is None:
        skipped[i] = 1
        texts += [""] * k
      else:
        used[i] = min(len(record["captions"]), k)
        texts += chosen
    out = {key: v.reshape(n, k, self.max_length) for key, v in
           tokenize_captions(self._tokenizer(), texts, self.max_length, self.special,
                             prompt_tokens(self._tokenizer(), self.prompt)).items()}
    out["loss_mask"] *= (np.arange(k)[None, :] < used[:, None])[:, :, None]
    out["image"] = images
    out["skipped"] = skipped
    return out
