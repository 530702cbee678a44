"""Images to uint8 pixels: decoded whole (to find damage), or decoded and
resized to the training size.

JPEGs are decoded with libjpeg-turbo's DCT scaling (simplejpeg) at the
smallest scale that still covers the target size, then resized once with
OpenCV; other formats go through Pillow. Normalisation happens on the device.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import simplejpeg
from PIL import Image

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
                      out: np.ndarray | None = None, crop_fraction: float = 1.0) -> np.ndarray:
  """Encoded image to uint8 [size, size, 3], written into `out` if given.

  mode "crop": the centre square, `crop_fraction` of the shorter side, to
  `size` (a processor's resize of the shorter side to S then centre crop C
  is C / S); "squash": the centre `crop_fraction` of each side (all of the
  image at 1) to `size` x `size` (DeiT's resize to S x S then centre crop C
  is C / S). With `rng` and
  `crop_scale` > 0 (training), a random resized crop instead: a region of
  `crop_scale` to all of the area, aspect ratio 3/4 to 4/3. resample "auto": area averaging to shrink by 2x or
  more, bilinear by less, bicubic to enlarge; or one of RESAMPLE's filters.
  Never flipped: captions say left and right.
  """
  if mode not in ("crop", "squash"):
    raise ValueError(f"data.resize: unknown mode {mode!r} (crop or squash)")
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"data.crop_fraction: {crop_fraction} is not in (0, 1]")
  if rng is not None and crop_scale > 0:
    img = decode_image(data, int(np.ceil(size / np.sqrt(crop_scale))))
    h, w = img.shape[:2]
    area = h * w * rng.uniform(crop_scale, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, max(1, round(np.sqrt(area / ratio)))))
    cw = int(min(w, max(1, round(np.sqrt(area * ratio)))))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return _resize(img[top:top + ch, left:left + cw], size, resample, out)
  img = decode_image(data, int(np.ceil(size / crop_fraction)))
  h, w = img.shape[:2]
  if mode == "crop":
    h = w = min(h, w)
  ch, cw = max(1, int(round(h * crop_fraction))), max(1, int(round(w * crop_fraction)))
  top, left = (img.shape[0] - ch) // 2, (img.shape[1] - cw) // 2
  return _resize(img[top:top + ch, left:left + cw], size, resample, out)
