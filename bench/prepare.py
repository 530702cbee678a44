"""`capjax prepare`: its speed with 1 and 2 workers against a plain loop
doing the same work in one process, and its peak memory at two data-set
sizes, measured in the same run on this machine.

N synthetic photo-like 640x480 JPEGs (bench/pipeline.py's, quality 90),
listed 4 times over (under other names) in a CSV table, for the speeds:

  loop          one process, one record after another: read the file, decode
                it whole, encode the record, write it to one ArrayRecord
                shard (shards.encode and records.shard_writer, what a
                prepare worker does, without prepare around it);
  workers_1/2   `prepare.prepare` on the same table with 1 and 2 workers, 8
                shards, timed from the call to its return (one worker is
                prepare's own process; two are a pool of worker processes,
                their start-up included, and the first such call of the run
                also starts the forkserver, as every `capjax prepare` does);
  memory        the peak memory of `capjax prepare` with 2 workers (each
                process's own memory at its peak, summed: bench/memory.py),
                on the table and on one 4 times larger (each image listed 4
                times under other names), and how much of the extra input it
                grew by.

Speeds are the best of --repeats rounds, the rounds alternating: this
machine's speed drifts. The last line is one JSON object with the figures.

  .venv/bin/python bench/prepare.py [--images 1500] [--repeats 2]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.memory import peak_memory  # noqa: E402
from bench.pipeline import photo_like  # noqa: E402
from pipeline import prepare, records, shards, sources  # noqa: E402


def table(folder: str, files: list[str], copies: int) -> str:
  """A CSV listing each image `copies` times (links under new names)."""
  rows = []
  for c in range(copies):
    for i, path in enumerate(files):
      name = f"{c}-{os.path.basename(path)}"
      if c:
        os.link(path, os.path.join(folder, name))
      else:
        name = os.path.basename(path)
      rows.append(f"{name},a photograph number {i}\n")
  path = os.path.join(folder, f"table-x{copies}.csv")
  with open(path, "w") as f:
    f.write("image,caption\n" + "".join(rows))
  return path


def loop(source, out: str) -> float:
  """Images per second of the same work in one process, one record at a time."""
  options = shards.Options()
  t = time.perf_counter()
  writer = records.shard_writer(out)
  for i in range(len(source)):
    data, _, _ = shards.encode(source[i], options)
    writer.write(data)
  writer.close()
  return len(source) / (time.perf_counter() - t)


def prepared(source, out: str, workers: int) -> float:
  t = time.perf_counter()
  summary = prepare.prepare(source, out, num_shards=8, workers=workers, progress_every=1e9)
  elapsed = time.perf_counter() - t
  assert summary["records"] == len(source), summary
  shutil.rmtree(out)
  return len(source) / elapsed


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", type=int, default=1500, help="JPEGs to generate (default: 1500)")
  p.add_argument("--repeats", type=int, default=2, help="rounds (default: 2)")
  args = p.parse_args()

  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    files = []
    for i in range(args.images):
      files.append(os.path.join(tmp, f"{i:05d}.jpg"))
      Image.fromarray(photo_like(rng)).save(files[-1], quality=90)
    input_bytes = sum(os.path.getsize(f) for f in files)
    small, large = table(tmp, files, 1), table(tmp, files, 4)
    source = sources.open_source(large)  # speed over 4N records: start-up a small share

    best = {"loop": 0.0, "workers_1": 0.0, "workers_2": 0.0}
    for _ in range(args.repeats):
      best["loop"] = max(best["loop"], loop(source, os.path.join(tmp, "loop.array_record")))
      for w in (1, 2):
        best[f"workers_{w}"] = max(best[f"workers_{w}"],
                                   prepared(source, os.path.join(tmp, "out"), w))
      print({k: round(v, 1) for k, v in best.items()}, file=sys.stderr, flush=True)

    peaks = []
    for spec in (small, large):
      out = os.path.join(tmp, "mem-out")
      proc, peak = peak_memory([sys.executable, "-m", "trainer.cli", "prepare", spec,
                                "--out", out, "--workers", "2"])
      assert proc.returncode == 0, proc.stderr
      shutil.rmtree(out)
      peaks.append(peak)
    extra = 3 * input_bytes

  mib = 1 << 20
  result = {
      "images": args.images, "mean_jpeg_kib": round(input_bytes / args.images / 1024, 1),
      "cpus": os.cpu_count(),
      "loop_images_per_s": round(best["loop"], 1),
      "workers_1_images_per_s": round(best["workers_1"], 1),
      "workers_2_images_per_s": round(best["workers_2"], 1),
      "workers_1_vs_loop": round(best["workers_1"] / best["loop"], 3),
      "workers_2_vs_workers_1": round(best["workers_2"] / best["workers_1"], 3),
      "peak_mib": [round(p / mib, 1) for p in peaks],
      "input_mib": [round(input_bytes / mib, 1), round(4 * input_bytes / mib, 1)],
      "peak_growth_of_extra_input": round((peaks[1] - peaks[0]) / extra, 4),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
