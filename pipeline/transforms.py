"""Per-example work: decode and resize images to uint8, tokenize captions.

JPEGs are decoded with libjpeg-turbo's DCT scaling (simplejpeg) at the
smallest scale that still covers the target size, then resized once with
OpenCV; other formats go through Pillow. Normalisation happens on the device.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import cv2
import grain
import numpy as np
import simplejpeg
from PIL import Image

from pipeline import tokenizer as tokenizer_lib

cv2.setNumThreads(1)  # Parallelism comes from Grain's workers, not OpenCV threads.


def _pil_decode(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img.convert("RGB"))


RESAMPLE = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR,
            "bicubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4}


def decode_and_resize(data: bytes, size: int, mode: str = "crop",
                      resample: str = "auto") -> np.ndarray:
  """Encoded image to uint8 [size, size, 3].

  mode "crop": shorter side to `size`, then the centre square; "squash": the
  whole image to `size` x `size`. resample "auto": area averaging to shrink,
  bicubic to enlarge; or one of RESAMPLE's filters.
  """
  if data[:2] == b"\xff\xd8":
    img = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size)
  else:
    img = _pil_decode(data)
  h, w = img.shape[:2]
  if mode == "crop":
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[top:top + side, left:left + side]
  elif mode != "squash":
    raise ValueError(f"data.resize: unknown mode {mode!r} (crop or squash)")
  if img.shape[0] != size or img.shape[1] != size:
    if resample == "auto":
      flag = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_CUBIC
    elif resample in RESAMPLE:
      flag = RESAMPLE[resample]
    else:
      raise ValueError(f"data.resample: unknown {resample!r} (auto or {', '.join(RESAMPLE)})")
    img = cv2.resize(img, (size, size), interpolation=flag)
  return np.ascontiguousarray(img)


def tokenize_captions(tok, captions: Sequence[str], max_length: int,
                      special: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
  """Decoder inputs, labels and loss mask, each [len(captions), max_length].

  inputs = [BOS] + tokens, labels = tokens + [EOS], truncated and padded.
  `special`: the model's (BOS, EOS, pad) ids; the tokenizer's by default.
  """
  ids = tok(list(captions), add_special_tokens=False)["input_ids"]
  bos, eos, pad = special or tokenizer_lib.special_ids(tok)
  n = len(captions)
  inputs = np.full((n, max_length), pad, np.int32)
  labels = np.full((n, max_length), pad, np.int32)
  mask = np.zeros((n, max_length), np.float32)
  for i, t in enumerate(ids):
    seq = ([bos] + t)[:max_length]
    lab = (t + [eos])[:max_length]
    inputs[i, :len(seq)] = seq
    labels[i, :len(lab)] = lab
    mask[i, :len(lab)] = 1.0
  return {"input_ids": inputs, "labels": labels, "loss_mask": mask}


class TrainExample(grain.transforms.RandomMap):
  """A record to an image and `captions_per_image` tokenized captions.

  An image with more captions gets a random subset each time it is seen; one
  with fewer repeats them with a zero loss mask, so every caption weighs the same.
  """

  def __init__(self, image_size: int, tokenizer_dir: str, max_length: int,
               captions_per_image: int, resize: str = "crop", resample: str = "auto",
               special: tuple[int, int, int] | None = None):
    self.image_size = image_size
    self.special = special
    self.tokenizer_dir = tokenizer_dir
    self.max_length = max_length
    self.captions_per_image = captions_per_image
    self.resize = resize
    self.resample = resample
    self._tok = None

  def __getstate__(self):
    return {**self.__dict__, "_tok": None}

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    if self._tok is None:
      self._tok = tokenizer_lib.load(self.tokenizer_dir)
    caps = record["captions"]
    k = self.captions_per_image
    order = rng.permutation(len(caps))
    chosen = [caps[order[i % len(caps)]] for i in range(k)]
    out = tokenize_captions(self._tok, chosen, self.max_length, self.special)
    out["loss_mask"][len(caps):] = 0.0
    out["image"] = decode_and_resize(record["image"], self.image_size, self.resize,
                                     self.resample)
    return out
