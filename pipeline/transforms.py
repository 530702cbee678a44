"""Per-example work: decode and resize images to uint8, tokenize captions.

JPEGs are decoded with libjpeg-turbo's DCT scaling (simplejpeg) at the
smallest scale that still covers the target size, then resized once with
OpenCV; other formats go through Pillow. Normalisation happens on the device.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Sequence

import cv2
import grain
import numpy as np
import simplejpeg
from PIL import Image

from pipeline import tokenizer as tokenizer_lib

cv2.setNumThreads(1)  # Parallelism comes from Grain's workers, not OpenCV threads.


class BadImage(ValueError):
  """An image that cannot be used; the message is the reason."""


# EXIF orientation (tag 274) to the numpy ops that undo it, applied in order.
_ORIENT = {2: (np.fliplr,), 3: (lambda a: np.rot90(a, 2),), 4: (np.flipud,),
           5: (lambda a: np.rot90(a, -1), np.fliplr), 6: (lambda a: np.rot90(a, -1),),
           7: (lambda a: np.rot90(a, 1), np.fliplr), 8: (lambda a: np.rot90(a, 1),)}


def _orientation(data: bytes) -> int:
  try:
    with Image.open(io.BytesIO(data)) as img:  # reads the header only
      return int(img.getexif().get(274, 1))
  except Exception:
    return 1


def _check_size(h: int, w: int) -> None:
  if Image.MAX_IMAGE_PIXELS and h * w > Image.MAX_IMAGE_PIXELS:
    raise BadImage("image larger than the decompression-bomb limit")


def _to_rgb(img: Image.Image) -> np.ndarray:
  """Any Pillow mode to uint8 RGB: transparency over white, 16- and 32-bit
  greys scaled down to 8 bits."""
  if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    a = np.asarray(img, np.float64)
    a = a / 257.0 if img.mode.startswith("I;16") or a.max() > 255 else a
    grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)
  if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "La",
                                                                     "RGBa"):
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
  return np.asarray(img.convert("RGB"))


def decode_image(data: bytes, min_size: int = 0) -> np.ndarray:
  """Encoded bytes to uint8 RGB [H, W, 3], upright by the EXIF orientation.

  JPEGs are decoded by libjpeg-turbo (simplejpeg), scaled down in the DCT to
  the smallest size whose shorter side still covers `min_size`; other formats
  by Pillow. Raises BadImage with the reason for anything unusable.
  """
  if not data:
    raise BadImage("empty file")
  orientation = 1
  if data[:2] == b"\xff\xd8":
    try:
      h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
      raise BadImage("not a readable image") from None
    _check_size(h, w)
    orientation = _orientation(data)
    try:
      img = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_size,
                                   min_width=min_size)
    except ValueError as e:
      raise BadImage("truncated image" if "end" in str(e).lower() else
                     f"not a readable image ({e})") from None
  else:
    try:
      with Image.open(io.BytesIO(data)) as pil:
        _check_size(pil.height, pil.width)
        orientation = int(pil.getexif().get(274, 1))
        pil.load()
        img = _to_rgb(pil)
    except BadImage:
      raise
    except Image.DecompressionBombError:
      raise BadImage("image larger than the decompression-bomb limit") from None
    except OSError as e:
      raise BadImage("truncated image" if "truncated" in str(e) else "not a readable image"
                     ) from None
    except Exception:  # Pillow raises many types for damaged files
      raise BadImage("not a readable image") from None
  for op in _ORIENT.get(orientation, ()):
    img = op(img)
  return img


RESAMPLE = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR,
            "bicubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4}


def _resize(img: np.ndarray, size: int, resample: str) -> np.ndarray:
  if img.shape[0] == size and img.shape[1] == size:
    return img
  if resample == "auto":
    flag = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_CUBIC
  elif resample in RESAMPLE:
    flag = RESAMPLE[resample]
  else:
    raise ValueError(f"data.resample: unknown {resample!r} (auto or {', '.join(RESAMPLE)})")
  return cv2.resize(img, (size, size), interpolation=flag)


def decode_and_resize(data: bytes, size: int, mode: str = "crop", resample: str = "auto",
                      rng: np.random.Generator | None = None,
                      crop_scale: float = 0.0) -> np.ndarray:
  """Encoded image to uint8 [size, size, 3].

  mode "crop": shorter side to `size`, then the centre square; "squash": the
  whole image to `size` x `size`. With `rng` and `crop_scale` > 0 (training),
  a random resized crop instead: a region of `crop_scale` to all of the area,
  aspect ratio 3/4 to 4/3. resample "auto": area averaging to shrink, bicubic
  to enlarge; or one of RESAMPLE's filters. Never flipped: captions say left
  and right.
  """
  if mode not in ("crop", "squash"):
    raise ValueError(f"data.resize: unknown mode {mode!r} (crop or squash)")
  if rng is not None and crop_scale > 0:
    img = decode_image(data, int(np.ceil(size / np.sqrt(crop_scale))))
    h, w = img.shape[:2]
    area = h * w * rng.uniform(crop_scale, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, max(1, round(np.sqrt(area / ratio)))))
    cw = int(min(w, max(1, round(np.sqrt(area * ratio)))))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return np.ascontiguousarray(_resize(img[top:top + ch, left:left + cw], size, resample))
  img = decode_image(data, size)
  h, w = img.shape[:2]
  if mode == "crop":
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[top:top + side, left:left + side]
  return np.ascontiguousarray(_resize(img, size, resample))


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
  with fewer repeats them with a zero loss mask, so every caption weighs the
  same. A record that cannot be used stops the run (`bad_records="fail"`, an
  error naming it) or (`"skip"`) becomes a blank example with a zero loss mask
  and `skipped` = 1, so batches keep their shape and the count reaches the
  run's metrics.
  """

  def __init__(self, image_size: int, tokenizer_dir: str, max_length: int,
               captions_per_image: int, resize: str = "crop", resample: str = "auto",
               special: tuple[int, int, int] | None = None, crop_scale: float = 0.0,
               bad_records: str = "skip"):
    if bad_records not in ("skip", "fail"):
      raise ValueError(f"data.bad_records: {bad_records!r} is not skip or fail")
    self.image_size = image_size
    self.special = special
    self.tokenizer_dir = tokenizer_dir
    self.max_length = max_length
    self.captions_per_image = captions_per_image
    self.resize = resize
    self.resample = resample
    self.crop_scale = crop_scale
    self.bad_records = bad_records
    self._tok = None
    self._reported = 0

  def __getstate__(self):
    return {**self.__dict__, "_tok": None}

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    if self._tok is None:
      self._tok = tokenizer_lib.load(self.tokenizer_dir)
    caps = record["captions"]
    k = self.captions_per_image
    try:
      if record.get("error"):
        raise BadImage(record["error"])
      if not caps:
        raise BadImage("no captions")
      image = decode_and_resize(record["image"], self.image_size, self.resize, self.resample,
                                rng, self.crop_scale)
    except BadImage as e:
      where = f"record {record.get('id')!r}" + (f" ({record['path']})" if "path" in record else "")
      if self.bad_records == "fail":
        raise BadImage(f"{where}: {e} (data.bad_records=fail)") from None
      if self._reported < 5:  # the first few reasons; the count goes to the metrics
        logging.warning("skipping %s: %s", where, e)
        self._reported += 1
      out = tokenize_captions(self._tok, [""] * k, self.max_length, self.special)
      out["loss_mask"][:] = 0.0
      out["image"] = np.zeros((self.image_size, self.image_size, 3), np.uint8)
      out["skipped"] = np.int32(1)
      return out
    order = rng.permutation(len(caps))
    chosen = [caps[order[i % len(caps)]] for i in range(k)]
    out = tokenize_captions(self._tok, chosen, self.max_length, self.special)
    out["loss_mask"][len(caps):] = 0.0
    out["image"] = image
    out["skipped"] = np.int32(0)
    return out
