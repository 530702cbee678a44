"""Per-example work: decode and resize images to uint8, tokenize captions.

JPEGs are decoded with libjpeg-turbo's DCT scaling (simplejpeg) at the
smallest scale that still covers the target size, then resized once with
OpenCV; other formats go through Pillow. Normalisation happens on the device.
"""

from __future__ import annotations

import io
import logging
import threading
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


def _jpeg_may_have_exif(data: bytes) -> bool:
  """False when the JPEG's metadata segments, read up to the image data,
  hold no EXIF block: most photos' orientation, settled without Pillow."""
  i, n = 2, len(data)
  while i + 4 <= n:
    if data[i] != 0xFF:
      return True  # not a segment where one should be: let Pillow judge
    marker = data[i + 1]
    if marker == 0xFF:  # fill byte
      i += 1
      continue
    if marker in (0xDA, 0xD9):  # start of scan, end of image: no more metadata
      return False
    if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
      return True
    i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
  return True


def _orientation(data: bytes) -> int:
  if data[:2] == b"\xff\xd8" and not _jpeg_may_have_exif(data):
    return 1
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


def _resize(img: np.ndarray, size: int, resample: str,
            out: np.ndarray | None = None) -> np.ndarray:
  h, w = img.shape[:2]
  if h == size and w == size:
    return img if out is None else np.copyto(out, img) or out
  if resample == "auto":
    # Area averaging costs as much as the decode at ratios that are not whole
    # numbers; below 2x, where JPEG's DCT scaling leaves every JPEG, bilinear
    # is within a third of a grey level of it at a sixth of the time.
    shrink = max(h, w) / size
    flag = (cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR if min(h, w) >= size
            else cv2.INTER_CUBIC)
  elif resample in RESAMPLE:
    flag = RESAMPLE[resample]
  else:
    raise ValueError(f"data.resample: unknown {resample!r} (auto or {', '.join(RESAMPLE)})")
  return cv2.resize(img, (size, size), dst=out, interpolation=flag)


def decode_and_resize(data: bytes, size: int, mode: str = "crop", resample: str = "auto",
                      rng: np.random.Generator | None = None, crop_scale: float = 0.0,
                      out: np.ndarray | None = None) -> np.ndarray:
  """Encoded image to uint8 [size, size, 3], written into `out` if given.

  mode "crop": shorter side to `size`, then the centre square; "squash": the
  whole image to `size` x `size`. With `rng` and `crop_scale` > 0 (training),
  a random resized crop instead: a region of `crop_scale` to all of the area,
  aspect ratio 3/4 to 4/3. resample "auto": area averaging to shrink by 2x or
  more, bilinear by less, bicubic to enlarge; or one of RESAMPLE's filters.
  Never flipped: captions say left and right.
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
    return _resize(img[top:top + ch, left:left + cw], size, resample, out)
  img = decode_image(data, size)
  h, w = img.shape[:2]
  if mode == "crop":
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[top:top + side, left:left + side]
  return _resize(img, size, resample, out)


def _token_ids(tok, captions: Sequence[str]) -> list[list[int]]:
  backend = getattr(tok, "backend_tokenizer", None)
  if backend is not None and backend.truncation is None and backend.padding is None:
    # The Rust tokenizer directly: what the wrapper's call returns, at a
    # fraction of its Python overhead (which shows at hundreds of images/s).
    return [backend.encode(c, add_special_tokens=False).ids for c in captions]
  return tok(list(captions), add_special_tokens=False)["input_ids"]


def tokenize_captions(tok, captions: Sequence[str], max_length: int,
                      special: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
  """Decoder inputs, labels and loss mask, each [len(captions), max_length].

  inputs = [BOS] + tokens, labels = tokens + [EOS], truncated and padded.
  `special`: the model's (BOS, EOS, pad) ids; the tokenizer's by default.
  """
  ids = _token_ids(tok, captions)
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
               bad_records: str = "skip", seed: int = 0):
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
               d.crop_scale if random_crops else 0.0, d.bad_records, cfg.seed)

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
                        self.crop_scale, out=image)
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
           tokenize_captions(self._tokenizer(), texts, self.max_length, self.special).items()}
    out["loss_mask"] *= (np.arange(k)[None, :] < used[:, None])[:, :, None]
    out["image"] = images
    out["skipped"] = skipped
    return out
