"""Input-pipeline speed: the whole Grain pipeline against the decode loop it
is built on, and that loop against the old script's Pillow path, measured in
the same run on this machine.

500 synthetic photo-like 640x480 JPEGs (smooth multi-scale colour fields,
shapes, grain; quality 90), prepared as capjax ArrayRecord shards, to 224x224:

  pil_baseline  Pillow full decode, bicubic resize, float32 normalisation
                (what run_image_captioning_flax.py did), one core;
  loop          capjax's decode_and_resize (libjpeg-turbo scaled decoding,
                OpenCV resize, uint8), one core;
  pipeline      the training stream (pipeline/loader.py) as the trainer
                runs it, with ONE worker process reading the shards in the
                epoch's random order, decoding, tokenising the captions and
                batching (32); timed in its steady state, over a few epochs,
                counting only batches the main process waited for;
  in_process    the same batches built in the main process, one after
                another, without the hand-over between processes.

Each is timed once per round, the rounds alternating, and the best round of
each kept: this machine's speed drifts.

The last line is one JSON object with the figures.

  .venv/bin/python bench/pipeline.py [--images 500] [--repeats 3]
"""

import argparse
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Grain's shared-memory batches are freed by the consumer; the resource tracker
# (a separate process, hence the environment) still warns about them at exit.
os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:multiprocessing.resource_tracker")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import images, loader, prepare, records, sources, tokenizer, transforms  # noqa: E402

SIZE, BATCH, PREFETCH = 224, 32, 4


def photo_like(rng: np.random.Generator, h: int = 480, w: int = 640) -> np.ndarray:
  """Colour fields at several scales, a few soft shapes and sensor grain:
  JPEG sizes and decode costs like a photograph's, unlike flat colour."""
  img = np.zeros((h, w, 3), np.float32)
  for cells, weight in ((3, 110.0), (12, 50.0), (48, 22.0), (160, 10.0)):
    field = rng.uniform(-1, 1, (cells * 3 // 4 + 1, cells + 1, 3)).astype(np.float32)
    img += weight * cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC)
  img += 128.0
  for _ in range(rng.integers(2, 6)):
    colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
    centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
    axes = (int(rng.integers(20, 160)), int(rng.integers(20, 120)))
    cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
  img = cv2.GaussianBlur(img, (0, 0), 1.2)
  img += rng.normal(0, 5, img.shape).astype(np.float32)
  return np.clip(img, 0, 255).astype(np.uint8)


def pil_baseline(data: bytes) -> np.ndarray:
  img = Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
  x = np.asarray(img, np.float32) / 255.0
  return (x - 0.5) / 0.5


def rate(fn, items) -> float:
  """Items per second, one pass."""
  t = time.perf_counter()
  for x in items:
    fn(x)
  return len(items) / (time.perf_counter() - t)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", type=int, default=500, help="JPEGs to generate (default: 500)")
  p.add_argument("--repeats", type=int, default=3, help="rounds (default: 3)")
  p.add_argument("--epochs", type=int, default=3, help="epochs per timed pipeline pass, for "
                 "its steady state (default: 3)")
  args = p.parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # Grain's worker reads absl flags

  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    items = []
    for i in range(args.images):
      path = os.path.join(tmp, f"{i:05d}.jpg")
      Image.fromarray(photo_like(rng)).save(path, quality=90)
      items.append((str(i), path, [f"a photograph number {i}", "colours and soft shapes"]))
    mean_kb = np.mean([os.path.getsize(x[1]) for x in items]) / 1024
    folder = os.path.join(tmp, "prepared")
    prepare.prepare(sources.FileSource(items, "bench"), folder, num_shards=4)
    source = records.PreparedSource(folder)
    blobs = [source[i]["image"] for i in range(len(source))]
    tok_dir = os.path.join(tmp, "tok")
    tokenizer.train_bpe([c for x in items for c in x[2]], 300, tok_dir)

    make_batch = transforms.TrainBatch(SIZE, tok_dir, 24, 1, "squash")

    def pipeline_pass() -> float:
      stream = iter(loader.train_stream(source, make_batch, BATCH, seed=0, workers=1,
                                        prefetch=PREFETCH))
      # Start-up (the worker's imports, its first batches into the buffer) is
      # not throughput: time only batches the main process had to wait for.
      for _ in range(PREFETCH + 2):
        first = next(stream)
      batches = args.epochs * len(source) // BATCH
      t = time.perf_counter()
      for _ in range(batches):
        next(stream)
      elapsed = time.perf_counter() - t
      stream.close()
      assert first["image"].shape == (BATCH, SIZE, SIZE, 3)
      return batches * BATCH / elapsed

    def in_process_pass() -> float:
      """The same batches built in this process, one after another: the
      stream without the hand-over between processes."""
      batches = loader.GlobalOrder(source, 0, BATCH).map(make_batch)
      t = time.perf_counter()
      for k in range(len(source) // BATCH):
        batches[k]
      return len(source) // BATCH * BATCH / (time.perf_counter() - t)

    # Alternated, best of each: this machine's speed drifts.
    pil = loop = pipe = inproc = 0.0
    for _ in range(args.repeats):
      pil = max(pil, rate(pil_baseline, blobs))
      loop = max(loop, rate(lambda b: images.decode_and_resize(b, SIZE, "squash"), blobs))
      inproc = max(inproc, in_process_pass())
      pipe = max(pipe, pipeline_pass())

  result = {
      "images": args.images, "jpeg_kb_mean": round(float(mean_kb), 1), "out_size": SIZE,
      "pil_baseline_images_per_s": round(pil, 1), "loop_images_per_s": round(loop, 1),
      "pipeline_one_worker_images_per_s": round(pipe, 1),
      "in_process_images_per_s": round(inproc, 1),
      "loop_vs_pil_baseline": round(loop / pil, 2), "pipeline_vs_loop": round(pipe / loop, 2),
      "in_process_vs_loop": round(inproc / loop, 2),
  }
  print(f"Pillow baseline {pil:.0f}/s, capjax loop {loop:.0f}/s ({loop / pil:.2f}x), "
        f"Grain pipeline with one worker {pipe:.0f}/s ({pipe / loop:.2f}x the loop), "
        f"its batches built in one process {inproc:.0f}/s ({inproc / loop:.2f}x)")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
