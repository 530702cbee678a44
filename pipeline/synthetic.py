"""The embedded default data: coloured shapes on textured backgrounds.

Each image holds one to three shapes, each with a size, a colour and a kind,
placed on a textured background. Every image gets five differently worded
reference captions built from one small grammar, and `parse_caption` reads
that grammar back, so a predicted caption can be checked for what it claims to
see (`content_accuracy`), not only for how much it overlaps the references.

The output is the COCO caption layout (`annotations/captions_{split}.json` and
`{split}/` JPEG folders), so the demo runs the same path as real COCO.
"""

from __future__ import annotations

import collections
import io
import json
import multiprocessing
import os
from typing import Iterable, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline import atomic

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 35),
    "orange": (250, 140, 10),
    "yellow": (245, 225, 20),
    "green": (30, 170, 60),
    "blue": (40, 80, 235),
    "purple": (150, 50, 205),
}
# Colours the demo never shows: a held-out variation for fine-tuning (LoRA).
HELD_OUT_COLOURS = {
    "pink": (245, 120, 190),
    "brown": (135, 80, 40),
    "cyan": (20, 210, 220),
    "lime": (160, 235, 40),
}
PALETTES = {"default": COLOURS, "held-out": HELD_OUT_COLOURS}
_ALL_COLOURS = {**COLOURS, **HELD_OUT_COLOURS}
SIZES = {"small": 0.085, "large": 0.17}  # radius as a fraction of the side
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "noisy")
COUNT_WORDS = {"one": 1, "single": 1, "two": 2, "three": 3}
_NUMBER = {1: "one", 2: "two", 3: "three"}
_REGIONS = (("top left", "top", "top right"),
            ("left", "centre", "right"),
            ("bottom left", "bottom", "bottom right"))


class Shape(NamedTuple):
  size: str
  colour: str
  kind: str
  x: float  # centre, as a fraction of the width
  y: float  # centre, as a fraction of the height

  def describe(self) -> str:
    return f"{self.size} {self.colour} {self.kind}"


def sample_scene(rng: np.random.Generator,
                 colours: Sequence[str] = tuple(COLOURS)) -> tuple[list[Shape], str]:
  """Draws one to three non-overlapping shapes, sorted left to right."""
  count = int(rng.integers(1, 4))
  shapes: list[Shape] = []
  seen = set()
  while len(shapes) < count:
    size = str(rng.choice(list(SIZES)))
    colour = str(rng.choice(list(colours)))
    kind = str(rng.choice(SHAPES))
    if (size, colour, kind) in seen:
      continue
    r = SIZES[size]
    for _ in range(100):
      x, y = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
      if all(np.hypot(x - s.x, y - s.y) > r + SIZES[s.size] + 0.03 for s in shapes):
        shapes.append(Shape(size, colour, kind, float(x), float(y)))
        seen.add((size, colour, kind))
        break
    else:  # no room left: start the scene again
      shapes, seen = [], set()
  shapes.sort(key=lambda s: s.x)
  return shapes, str(rng.choice(BACKGROUNDS))


def _background(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
  # Greyish, so that no background passes for one of the shape colours.
  base = rng.uniform(80, 170) + rng.uniform(-20, 20, size=3)
  tint = base + rng.uniform(-40, 40) + rng.uniform(-10, 10, size=3)
  yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
  period = rng.uniform(side / 10, side / 5)
  if kind == "striped":
    angle = rng.uniform(0, np.pi)
    wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    mask = (wave > 0)[..., None]
  elif kind == "checkered":
    mask = (((xx // period) + (yy // period)) % 2 == 0)[..., None]
  elif kind == "dotted":
    cx = (xx % period) - period / 2
    cy = (yy % period) - period / 2
    mask = (np.hypot(cx, cy) < period / 5)[..., None]
  else:
    mask = np.zeros((side, side, 1), bool)
  img = np.where(mask, tint, base).astype(np.float32)
  noise_level = 28 if kind == "noisy" else 8
  img += rng.normal(0, noise_level, size=img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def render(shapes: Sequence[Shape], background: str, side: int,
           rng: np.random.Generator) -> Image.Image:
  """Draws the shapes at twice the size and halves them, for smooth edges."""
  big = 2 * side
  layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
  draw = ImageDraw.Draw(layer)
  for s in shapes:
    cx, cy, r = s.x * big, s.y * big, SIZES[s.size] * big
    fill = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255))
                 for c in _ALL_COLOURS[s.colour]) + (255,)
    if s.kind == "circle":
      draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif s.kind == "square":
      h = r * 0.85
      draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif s.kind == "triangle":
      draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75),
                    (cx + r * 0.95, cy + r * 0.75)], fill=fill)
    else:  # cross
      t = r * 0.33
      draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
      draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
  img = Image.fromarray(_background(background, side, rng)).convert("RGBA")
  img.alpha_composite(layer.resize((side, side), Image.Resampling.BOX))
  return img.convert("RGB")


def _region(s: Shape) -> str:
  return _REGIONS[min(int(s.y * 3), 2)][min(int(s.x * 3), 2)]


def captions_for(shapes: Sequence[Shape], background: str) -> list[str]:
  """Five differently worded captions; each names every shape in full."""
  d = [s.describe() for s in shapes]
  bg = background
  if len(shapes) == 1:
    (a,) = d
    return [
        f"a {a} on a {bg} background",
        f"one {a} in the {_region(shapes[0])} of the image",
        f"a single {a}",
        f"there is one {a} near the {_region(shapes[0])}",
        f"a picture of a {a} on a {bg} background",
    ]
  if len(shapes) == 2:
    a, b = d
    sa, sb = shapes
    if abs(sa.y - sb.y) > 0.25:
      vertical = f"a {a} above a {b}" if sa.y < sb.y else f"a {a} below a {b}"
    else:
      vertical = f"a {a} next to a {b}"
    return [
        f"a {a} and a {b}",
        f"a {a} to the left of a {b}",
        f"two shapes : a {a} and a {b} on a {bg} background",
        f"a {b} to the right of a {a}",
        vertical,
    ]
  a, b, c = d
  return [
      f"three shapes : a {a} , a {b} and a {c}",
      f"a {a} , a {b} and a {c} on a {bg} background",
      f"there are three objects : a {a} , a {b} and a {c}",
      f"a {a} to the left of a {b} and a {c}",
      f"from left to right : a {a} , a {b} and a {c}",
  ]


class Parsed(NamedTuple):
  count: int | None  # the count word, if the caption says one
  objects: collections.Counter  # (size, colour, kind) -> occurrences


def parse_caption(caption: str) -> Parsed:
  """Reads back what a caption claims: every `size colour kind` and the count."""
  words = caption.lower().replace(",", " ").replace(".", " ").split()
  objects: collections.Counter = collections.Counter()
  count = None
  for i, w in enumerate(words):
    if count is None and w in COUNT_WORDS:
      count = COUNT_WORDS[w]
    if (w in SIZES and i + 2 < len(words) and words[i + 1] in _ALL_COLOURS
        and words[i + 2] in SHAPES):
      objects[(w, words[i + 1], words[i + 2])] += 1
  return Parsed(count, objects)


def caption_is_right(prediction: str, references: Iterable[str]) -> bool:
  """True when the prediction names exactly the scene's shapes and count.

  The truth is read from the references with the same grammar; they must agree.
  """
  truths = {frozenset(parse_caption(r).objects.items()) for r in references}
  if len(truths) != 1:
    raise ValueError(f"references disagree on the scene: {list(references)}")
  truth = collections.Counter(dict(truths.pop()))
  got = parse_caption(prediction)
  n = sum(truth.values())
  return got.objects == truth and (got.count is None or got.count == n)


def content_accuracy(predictions: Sequence[str],
                     references: Sequence[Sequence[str]]) -> float:
  """Share of predictions that name every shape right, with the right count."""
  if not predictions:
    return 0.0
  right = sum(caption_is_right(p, r) for p, r in zip(predictions, references))
  return right / len(predictions)


def _make_one(args: tuple[int, int, int, str, str]) -> tuple[dict, list[str]]:
  index, seed, side, folder, palette = args
  rng = np.random.default_rng([seed, index])
  shapes, background = sample_scene(rng, tuple(PALETTES[palette]))
  img = render(shapes, background, side, rng)
  name = f"{index:06d}.jpg"
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=90)
  with open(os.path.join(folder, name), "wb") as f:
    f.write(buf.getvalue())
  image = {"id": index, "file_name": name, "width": side, "height": side}
  return image, captions_for(shapes, background)


def generate(out_dir: str, num_train: int = 10_000, num_val: int = 500,
             side: int = 96, seed: int = 0, processes: int | None = None,
             palette: str = "default") -> dict:
  """Writes the COCO caption layout under `out_dir`; returns counts.
  `palette` "held-out" paints the shapes in colours the default set never
  uses (a new domain to fine-tune on).

  Deterministic in (`seed`, index), whatever the number of processes. Written
  into a temporary folder beside `out_dir` and renamed when complete.
  """
  counts = {}
  with atomic.folder(out_dir) as tmp:
    os.makedirs(os.path.join(tmp, "annotations"))
    with multiprocessing.get_context("forkserver").Pool(processes or os.cpu_count()) as pool:
      offset = caption_id = 0
      for split, n in (("train", num_train), ("val", num_val)):
        folder = os.path.join(tmp, split)
        os.makedirs(folder)
        # Validation indices follow training ones so no image repeats.
        jobs = [(offset + i, seed, side, folder, palette) for i in range(n)]
        images, annotations = [], []
        for image, caps in pool.imap(_make_one, jobs, chunksize=64):
          images.append(image)
          for cap in caps:
            caption_id += 1
            annotations.append({"id": caption_id, "image_id": image["id"],
                                "caption": cap})
        offset += n
        with open(os.path.join(tmp, "annotations", f"captions_{split}.json"), "w") as f:
          json.dump({"info": {"description": "capjax synthetic shapes"},
                     "images": images, "annotations": annotations}, f)
        counts[split] = {"images": len(images), "captions": len(annotations)}
  return counts


def main(argv: Sequence[str] | None = None) -> None:
  import argparse

  p = argparse.ArgumentParser(
      prog="python -m pipeline.synthetic",
      description="Writes the synthetic shapes captioning set in the COCO layout.")
  p.add_argument("out", help="output folder (replaced when complete)")
  p.add_argument("--train", type=int, default=10_000, help="training images (default: 10000)")
  p.add_argument("--val", type=int, default=500, help="validation images (default: 500)")
  p.add_argument("--side", type=int, default=96, help="image side in pixels (default: 96)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--palette", choices=sorted(PALETTES), default="default",
                 help="shape colours: the default six, or four held out from them "
                      f"({', '.join(HELD_OUT_COLOURS)}) for fine-tuning on a new domain")
  args = p.parse_args(argv)
  counts = generate(args.out, args.train, args.val, args.side, args.seed,
                    palette=args.palette)
  print(json.dumps(counts))


if __name__ == "__main__":
  main()
