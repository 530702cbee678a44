"""Recaptioning speed end to end (read, decode, generate, write): `capjax
caption` against the loop a user writes with transformers, on the same
weights, the same images and the same decoding, in the same run.

  demo           the demo config's shapes (ViT 4 x 128 at 64 px + GPT-2 3 x 128);
  vit_b16_gpt2   ViT-B/16 (224 px) + GPT-2 124M with GPT-2's 50,257-token
                 vocabulary.

Random weights, saved as a transformers VisionEncoderDecoderModel and brought
in with `capjax import-hf`; EOS made unreachable so that both decode all
`--new-tokens` tokens with 4 beams. The images are photo-like 640x480 JPEGs
in img2dataset-style tars. capjax: `capjax caption` in its own process, its
rate over the work after compilation (its own last line), and the share of
that time its devices waited for images. transformers: per tar, each
sample's JPEG opened with PIL, the model's ViTImageProcessor, `generate` on
batches, `batch_decode`, a Parquet file written; its rate after a warm-up
batch. The last line is one JSON object.

  .venv/bin/python bench/caption.py [--images 48] [--models demo,vit_b16_gpt2]
"""

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

MODELS = {
    "demo": dict(encoder=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                              intermediate_size=512, image_size=64, patch_size=8),
                 decoder=dict(vocab_size=384, n_positions=64, n_embd=128, n_layer=3, n_head=4),
                 batch=32),
    "vit_b16_gpt2": dict(encoder=dict(hidden_size=768, num_hidden_layers=12,
                                      num_attention_heads=12, intermediate_size=3072,
                                      image_size=224, patch_size=16),
                         decoder=dict(vocab_size=50257, n_positions=64, n_embd=768, n_layer=12,
                                      n_head=12), batch=16),
}
BEAMS, PER_TAR = 4, 32


def _jpegs(n: int) -> list[bytes]:
  import cv2
  from bench.pipeline import photo_like
  rng = np.random.default_rng(0)
  return [cv2.imencode(".jpg", photo_like(rng)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
          .tobytes() for _ in range(n)]


def _tars(folder: str, jpegs: list[bytes]) -> list[str]:
  paths = []
  for t in range(0, len(jpegs), PER_TAR):
    path = os.path.join(folder, f"{t // PER_TAR:05d}.tar")
    with tarfile.open(path, "w") as tar:
      for i, data in enumerate(jpegs[t:t + PER_TAR], start=t):
        for ext, payload in (("jpg", data), ("txt", b"an original caption")):
          info = tarfile.TarInfo(f"{i:09d}.{ext}")
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))
    paths.append(path)
  return paths


def _model(name: str, folder: str):
  """A random VisionEncoderDecoderModel saved with a tokenizer and processor."""
  import torch
  import transformers
  from pipeline import tokenizer as tokenizer_lib
  m = MODELS[name]
  tok = tokenizer_lib.train_bpe(["a photo of a cat", "two dogs on a red sofa"], 280, folder)
  eos = 0
  torch.manual_seed(0)
  cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
      transformers.ViTConfig(**m["encoder"]),
      transformers.GPT2Config(**m["decoder"], add_cross_attention=True, is_decoder=True,
                              bos_token_id=eos, eos_token_id=eos))
  cfg.decoder_start_token_id = cfg.pad_token_id = cfg.eos_token_id = eos
  model = transformers.VisionEncoderDecoderModel(cfg).eval()
  with torch.no_grad():
    model.decoder.transformer.wte.weight[eos].zero_()  # EOS's logit stays 0: never chosen
  model.save_pretrained(folder)
  tok.save_pretrained(folder)
  side = m["encoder"]["image_size"]
  transformers.ViTImageProcessor(size={"height": side, "width": side}).save_pretrained(folder)
  return model, tok


def transformers_loop(model, tok, processor, tars: list[str], out: str, batch: int,
                      new_tokens: int) -> tuple[float, int]:
  """The loop a user writes: (images/s after a warm-up batch, images)."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  import torch
  from PIL import Image

  def caption(images):
    with torch.no_grad():
      pixels = processor(images=images, return_tensors="pt").pixel_values
      ids = model.generate(pixel_values=pixels, num_beams=BEAMS, max_new_tokens=new_tokens,
                           do_sample=False)
    return tok.batch_decode(ids, skip_special_tokens=True)

  caption([Image.new("RGB", (640, 480))] * batch)  # warm-up
  t, n = time.perf_counter(), 0
  for path in tars:
    keys, images = [], []
    with tarfile.open(path) as tar:
      for member in tar:
        if member.name.endswith(".jpg"):
          keys.append(member.name[:-4])
          images.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
    captions = []
    for i in range(0, len(images), batch):
      captions += caption(images[i:i + batch])
    pq.write_table(pa.table({"key": keys, "caption": captions}),
                   os.path.join(out, os.path.basename(path)[:-4] + ".parquet"))
    n += len(images)
  return n / (time.perf_counter() - t), n


def measure(name: str, images: int, new_tokens: int) -> dict:
  import torch
  import transformers
  m = MODELS[name]
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir, run = os.path.join(tmp, "hf"), os.path.join(tmp, "run")
    os.makedirs(os.path.join(tmp, "tars"))
    model, tok = _model(name, hf_dir)
    tars = _tars(os.path.join(tmp, "tars"), _jpegs(images))
    cli = [sys.executable, "-m", "trainer.cli"]
    subprocess.run(cli + ["import-hf", hf_dir, "--out", run], check=True, cwd=ROOT,
                   capture_output=True)
    t = time.perf_counter()
    proc = subprocess.run(cli + ["caption", *tars, "--checkpoint", run, "--out",
                                 os.path.join(tmp, "ours"), "--num-beams", str(BEAMS),
                                 "--max-length", str(new_tokens), "--batch-size",
                                 str(m["batch"])], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
      raise RuntimeError(f"capjax caption failed:\n{proc.stderr[-3000:]}")
    done = re.search(r"\(([\d,.]+) images/s, waiting for images ([\d.]+)% of it\)", proc.stderr)
    ours, wait = float(done.group(1).replace(",", "")), round(float(done.group(2)) / 100, 4)
    os.makedirs(os.path.join(tmp, "theirs"))
    processor = transformers.ViTImageProcessor.from_pretrained(hf_dir)
    theirs, n = transformers_loop(model, tok, processor, tars, os.path.join(tmp, "theirs"),
                                  m["batch"], new_tokens)
  return {"images": n, "batch": m["batch"], "num_beams": BEAMS, "new_tokens": new_tokens,
          "capjax_images_per_s": ours, "capjax_wall_s_with_startup": round(wall, 1),
          "device_wait_fraction": wait, "transformers_images_per_s": round(theirs, 2),
          "torch_threads": torch.get_num_threads(),
          "speedup_vs_transformers": round(ours / theirs, 2)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", type=int, default=64, help="images per model (default: 64)")
  p.add_argument("--new-tokens", type=int, default=24, help="tokens per caption (default: 24)")
  p.add_argument("--models", default="demo,vit_b16_gpt2", help="comma-separated: "
                 f"{', '.join(MODELS)} (default: both)")
  args = p.parse_args()
  result = {}
  for name in args.models.split(","):
    result[name] = measure(name, args.images, args.new_tokens)
    print(f"{name}: {result[name]}", flush=True)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
