"""The accelerator bench: capjax's train step and beam search against
PyTorch on the same chip, and the host's JPEG decoding rate, as one JSON line.

  train       capjax's step for ViT-B/16 (224 px) + GPT-2 124M in bfloat16:
              images/s, tokens/s and MFU (XLA's FLOP count over the chip's
              bfloat16 peak) at each batch size, with 5 captions per image
              behind one encoder pass, and with 1;
  pytorch     the same model and batch as a user writes it today:
              transformers' VisionEncoderDecoderModel, SDPA attention,
              bfloat16 autocast, fused AdamW, each image repeated for each
              of its captions; eager and under torch.compile;
              `speedup_vs_pytorch` is the better PyTorch time over capjax's;
  generate    beam search (4 beams, 32 new tokens, bfloat16) against
              transformers' `generate` on the same weights;
  loader      photo-like 640x480 JPEGs decoded and resized to 224 px on every
              host core; `host_cores_per_device` is the number of cores that
              feeds the best measured training rate.

Dropout as GPT-2's config sets it (0.1) except on attention probabilities
(0 in both frameworks, so that each uses its fused attention kernel).
Nothing is downloaded: the models are random. Each part records its own
error instead of ending the bench, and parts that would pass `--budget`
seconds are skipped and say so; after each part the JSON so far is written
to `--out`. On a GPU it takes 5 to 8 minutes; `--tiny` runs seconds-sized
models anywhere (its test runs it on the CPU).

  python bench/device.py [--tiny] [--budget 420] [--out device.json]
"""

import argparse
import io
import json
import os
import sys
import time
import traceback
import multiprocessing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VIT_B16 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, image_size=224, patch_size=16)
GPT2_124M = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
SIZES = {
    "full": dict(encoder=VIT_B16, decoder=GPT2_124M, length=32, batches=(64, 128, 256),
                 torch_batch=128, steps=10, gen_batch=64,
                 new_tokens=32, loader_images=256),
    "tiny": dict(encoder=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, image_size=32, patch_size=8),
                 decoder=dict(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2),
                 length=8, batches=(4, 8), torch_batch=4, steps=2,
                 gen_batch=2, new_tokens=6, loader_images=8),
}
DROPOUT = dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0)
CAPTIONS, BEAMS, EOS = 5, 4, 0


def _config(size: dict, batch: int, captions: int):
  from configs import demo
  cfg = demo.get_config()
  cfg.model.encoder.update(size["encoder"], hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
  cfg.model.decoder.update(size["decoder"], **DROPOUT, bos_token_id=EOS, eos_token_id=EOS,
                           pad_token_id=EOS)
  cfg.model.dtype = "bfloat16"
  cfg.data.image_size = size["encoder"]["image_size"]
  cfg.data.max_length = size["length"]
  cfg.data.captions_per_image = captions
  cfg.train.batch_size = batch
  cfg.mesh.data = -1
  return cfg


PEAK_OVERRIDE = 0.0  # --peak-flops


def _peak() -> float | None:
  import jax
  from trainer import flops as flops_lib
  return flops_lib.peak_flops(jax.devices()[0].device_kind, PEAK_OVERRIDE)


def capjax_train(size: dict, batch: int, captions: int) -> dict:
  """Step time of capjax's jitted train step on every local device."""
  import jax
  import numpy as np
  from trainer import sharding, step as step_lib

  cfg = _config(size, batch, captions)
  mesh = sharding.make_mesh(cfg.mesh)
  setup = step_lib.setup(cfg, mesh)
  params, opt = setup.init()
  runner = step_lib.StepRunner(setup, cfg, mesh, 0)
  rng = np.random.default_rng(0)
  n, side, vocab = size["length"], cfg.data.image_size, cfg.model.decoder.vocab_size
  ids = rng.integers(1, vocab, (batch, captions, n + 1)).astype(np.int32)
  data = sharding.global_batch({
      "image": rng.integers(0, 256, (batch, side, side, 3), np.uint8),
      "input_ids": ids[..., :-1], "labels": ids[..., 1:],
      "loss_mask": np.ones((batch, captions, n), np.float32),
      "skipped": np.zeros((batch,), np.int32)}, mesh)
  for _ in range(2):  # compiles, then settles
    params, opt, metrics = runner(params, opt, data)
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(size["steps"]):
    params, opt, metrics = runner(params, opt, data)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t) / size["steps"]
  peak = _peak()
  flops = runner.flops  # one device's share
  return {"batch": batch, "captions_per_image": captions, "step_s": float(f"{step_s:.4g}"),
          "images_per_s": round(batch / step_s, 1),
          "tokens_per_s": round(batch * captions * n / step_s, 1),
          "tflop_per_step_per_device": flops and float(f"{flops / 1e12:.4g}"),
          "mfu": float(f"{flops / step_s / peak:.4g}") if flops and peak else None,
          "attention": _attention_backend()}


def _attention_backend() -> str:
  from trainer.models import attention
  return attention.resolve("auto")


def _hf_model(size: dict):
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
      transformers.ViTConfig(**size["encoder"]),
      transformers.GPT2Config(**size["decoder"], **DROPOUT, add_cross_attention=True,
                              is_decoder=True, bos_token_id=EOS, eos_token_id=EOS))
  cfg.decoder_start_token_id = cfg.pad_token_id = cfg.eos_token_id = EOS
  return transformers.VisionEncoderDecoderModel(cfg)


def pytorch_train(size: dict, batch: int, captions: int, compiled: bool) -> dict:
  """The same step in PyTorch, images repeated for their captions."""
  import torch
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  model = _hf_model(size).to(dev).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=dev == "cuda")
  side, n = size["encoder"]["image_size"], size["length"]
  pixels = torch.randn(batch, 3, side, side, device=dev).repeat_interleave(captions, 0)
  labels = torch.randint(1, size["decoder"]["vocab_size"], (batch * captions, n), device=dev)
  forward = torch.compile(model) if compiled else model

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16):
      loss = forward(pixel_values=pixels, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  for _ in range(3):  # compiles (torch.compile), then settles
    step()
  sync()
  t = time.perf_counter()
  for _ in range(size["steps"]):
    step()
  sync()
  step_s = (time.perf_counter() - t) / size["steps"]
  return {"batch": batch, "captions_per_image": captions, "compiled": compiled,
          "step_s": float(f"{step_s:.4g}"), "images_per_s": round(batch / step_s, 1),
          "attention": model.config.decoder._attn_implementation}


def generate(size: dict) -> dict:
  """Beam search on the same weights: capjax's compiled loop, transformers'
  `generate`, both in bfloat16; EOS made unreachable so both decode every token."""
  import tempfile
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import nnx
  from trainer import generate as generate_lib
  from trainer.hf import importer, weights
  from trainer.models.captioner import Captioner
  from trainer.models.gpt2 import GPT2Config
  from trainer.models.vit import ViTConfig

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  hf = _hf_model(size).eval()
  with torch.no_grad():
    hf.decoder.transformer.wte.weight[EOS].zero_()
  with tempfile.TemporaryDirectory() as folder:
    hf.save_pretrained(folder)
    tensors = importer.read_tensors(folder)
  enc = ViTConfig(**size["encoder"])
  dec = GPT2Config(**size["decoder"], bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
  model = Captioner(enc, dec, (0.5,) * 3, (0.5,) * 3, nnx.Rngs(0), dtype=jnp.bfloat16)
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, jax.tree.map(
      np.asarray, weights.to_capjax(tensors, enc, dec, with_projection=False)))
  graphdef = nnx.graphdef(model)
  hf = hf.to(dev, torch.bfloat16)
  b, side, new = size["gen_batch"], enc.image_size, size["new_tokens"]
  images = np.random.default_rng(0).integers(0, 256, (b, side, side, 3)).astype(np.uint8)
  pixels = torch.from_numpy(((images / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy())
  pixels = pixels.to(dev, torch.bfloat16)
  search = jax.jit(lambda p, x: generate_lib.beam_search(nnx.merge(graphdef, p), x, new,
                                                         BEAMS, EOS, EOS, EOS))
  on_device = jax.device_put(jnp.asarray(images))

  def ours():
    return np.asarray(search(params, on_device))

  def theirs():
    with torch.no_grad():
      return hf.generate(pixel_values=pixels, max_new_tokens=new, num_beams=BEAMS,
                         do_sample=False)[:, 1:].cpu().numpy()

  a, b_ = ours(), theirs()  # compiles; warms up
  t_ours, t_theirs = _best(ours), _best(theirs)
  return {"batch": b, "num_beams": BEAMS, "new_tokens": new,
          "images_per_s": round(b / t_ours, 1),
          "transformers_images_per_s": round(b / t_theirs, 1),
          "speedup_vs_transformers": round(t_theirs / t_ours, 2),
          # bfloat16 rounding decides near-ties differently; the share says how often
          "identical_captions_share": float(np.mean(np.all(a == b_[:, :a.shape[1]], axis=1)))}


def _best(fn, repeats: int = 3) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def _photo(seed: int) -> bytes:
  """A 640x480 JPEG with a photo's mix of smooth areas, edges and noise."""
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:480, 0:640] / 480.0
  img = np.stack([np.sin(x * rng.uniform(2, 9)), np.cos(y * rng.uniform(2, 9)), x * y], -1)
  img = (img - img.min()) / (np.ptp(img) + 1e-6) * 200 + rng.normal(0, 12, (480, 640, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def _decode(data: bytes) -> int:
  from pipeline import images
  return images.decode_and_resize(data, 224, "crop").shape[0]


def loader(size: dict) -> dict:
  """JPEG decode and resize to 224 px (the loader's work per image) on every
  host core, in worker processes as Grain runs it."""
  cores = os.cpu_count() or 1
  photos = [_photo(i) for i in range(16)]
  work = [photos[i % len(photos)] for i in range(size["loader_images"] * cores)]
  # Spawned, not forked: a fork of a process running JAX's threads can deadlock.
  with multiprocessing.get_context("spawn").Pool(cores) as pool:
    pool.map(_decode, photos * cores)  # workers up, imports done
    t = time.perf_counter()
    pool.map(_decode, work, chunksize=8)
    took = time.perf_counter() - t
  return {"host_cores": cores, "images_per_s": round(len(work) / took, 1),
          "images_per_s_per_core": round(len(work) / took / cores, 1)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="seconds-sized models (any machine)")
  p.add_argument("--budget", type=float, default=420.0,
                 help="seconds: parts that would start later are skipped (default: 420)")
  p.add_argument("--out", default="", help="also write the JSON here, after each part")
  p.add_argument("--peak-flops", type=float, default=0.0, help="one device's bfloat16 peak "
                 "FLOP/s, for chips trainer/flops.py does not know (default: its table)")
  p.add_argument("--skip", default="", help="comma-separated parts to leave out "
                 "(train, pytorch, pytorch_compiled, generate, loader)")
  args = p.parse_args()
  global PEAK_OVERRIDE
  PEAK_OVERRIDE = args.peak_flops
  size = SIZES["tiny" if args.tiny else "full"]
  skip = set(filter(None, args.skip.split(",")))
  start = time.perf_counter()
  import jax
  result = {"size": "tiny" if args.tiny else "full", "device": jax.devices()[0].device_kind,
            "devices": jax.device_count(), "jax": jax.__version__, "peak_bf16": _peak(),
            "train": [], "pytorch": [], "errors": {}, "skipped": []}

  def part(name, fn, *a):
    if name.split("/")[0] in skip:
      return None
    if time.perf_counter() - start > args.budget:
      result["skipped"].append(name)
      return None
    try:
      out = fn(*a)
    except Exception as e:  # noqa: BLE001 - one part's failure is data, not the end
      traceback.print_exc()
      result["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      out = None
    if args.out:
      with open(args.out + ".tmp", "w") as f:
        json.dump(result, f)
      os.replace(args.out + ".tmp", args.out)
    return out

  for batch in size["batches"]:
    if (got := part(f"train/{batch}x{CAPTIONS}", capjax_train, size, batch, CAPTIONS)):
      result["train"].append(got)
      print(got, flush=True)
  b = size["torch_batch"]  # PyTorch's batch, and capjax's with one caption
  if (got := part(f"train/{b}x1", capjax_train, size, b, 1)):
    result["train"].append(got)
  for captions in (CAPTIONS, 1):
    for compiled in (False, True):
      name = "pytorch_compiled" if compiled else "pytorch"
      if (got := part(f"{name}/{b}x{captions}", pytorch_train, size, b, captions, compiled)):
        result["pytorch"].append(got)
        print(got, flush=True)
  result["speedup_vs_pytorch"] = _speedups(result, b)
  result["generate"] = part("generate", generate, size)
  result["loader"] = part("loader", loader, size)
  trained = [r for r in result["train"] if r["captions_per_image"] == CAPTIONS]
  if result["loader"] and trained:
    best = max(r["images_per_s"] for r in trained) / result["devices"]
    result["host_cores_per_device"] = round(best / result["loader"]["images_per_s_per_core"], 2)
  mfus = [r["mfu"] for r in result["train"] if r.get("mfu")]
  result["best_mfu"] = max(mfus) if mfus else None
  result["seconds"] = round(time.perf_counter() - start, 1)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f)
  print(json.dumps(result))


def _speedups(result: dict, batch: int) -> dict:
  """Per caption count: the better PyTorch step time over capjax's, same batch."""
  out = {}
  for captions in (CAPTIONS, 1):
    ours = [r["step_s"] for r in result["train"]
            if (r["batch"], r["captions_per_image"]) == (batch, captions)]
    theirs = {r["compiled"]: r["step_s"] for r in result["pytorch"]
              if r["captions_per_image"] == captions}
    if ours and theirs:
      out[f"{captions}_captions"] = {
          "vs_eager": theirs.get(False) and round(theirs[False] / ours[0], 2),
          "vs_compiled": theirs.get(True) and round(theirs[True] / ours[0], 2),
          "vs_better": round(min(theirs.values()) / ours[0], 2)}
  return out


if __name__ == "__main__":
  main()
