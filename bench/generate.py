"""Beam-search captioning speed: capjax against transformers' PyTorch
`generate` on the same weights, measured in the same run on this machine.

ViT 6 layers x 384 (224px, patch 16) + GPT-2 6 layers x 384 (GPT-2's 50,257
token vocabulary), beams 4, 32 new tokens, batch 16. EOS is made unreachable
so both decode all 32 tokens. Both outputs are checked to be the same tokens.
The last line is one JSON object with the figures.

  .venv/bin/python bench/generate.py [--repeats 3]
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from trainer import generate  # noqa: E402
from trainer.hf import importer, weights  # noqa: E402
from trainer.models.captioner import Captioner  # noqa: E402
from trainer.models.gpt2 import GPT2Config  # noqa: E402
from trainer.models.vit import ViTConfig  # noqa: E402

BATCH, BEAMS, NEW_TOKENS = 16, 4, 32


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--repeats", type=int, default=3, help="timed runs of each (default: 3)")
  args = p.parse_args()
  torch.manual_seed(0)
  enc = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
             image_size=224, patch_size=16)
  dec = dict(vocab_size=50257, n_positions=64, n_embd=384, n_layer=6, n_head=6)
  eos = 50256
  cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
      transformers.ViTConfig(**enc),
      transformers.GPT2Config(**dec, add_cross_attention=True, is_decoder=True,
                              bos_token_id=eos, eos_token_id=eos))
  cfg.decoder_start_token_id = cfg.pad_token_id = cfg.eos_token_id = eos
  hf = transformers.VisionEncoderDecoderModel(cfg).eval()
  with torch.no_grad():
    hf.decoder.transformer.wte.weight[eos].zero_()  # EOS's logit stays 0: never in the top 8

  with tempfile.TemporaryDirectory() as folder:  # the checkpoint names, as on disk
    hf.save_pretrained(folder)
    tensors = importer.read_tensors(folder)
  ours_cfg = (ViTConfig(**enc), GPT2Config(**dec, bos_token_id=eos, eos_token_id=eos,
                                           pad_token_id=eos))
  model = Captioner(*ours_cfg, (0.5,) * 3, (0.5,) * 3, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, jax.tree.map(
      np.asarray, weights.to_capjax(tensors, *ours_cfg, with_projection=False)))
  graphdef = nnx.graphdef(model)

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (BATCH, 224, 224, 3)).astype(np.uint8)
  pixels = torch.from_numpy(((images / 255.0 - 0.5) / 0.5).astype(np.float32).transpose(0, 3, 1, 2))

  @jax.jit
  def ours(params, images):
    return generate.beam_search(nnx.merge(graphdef, params), images, NEW_TOKENS, BEAMS,
                                eos, eos, eos)

  def run_ours():
    return np.asarray(ours(params, jnp.asarray(images)))

  def run_hf():
    with torch.no_grad():
      return hf.generate(pixel_values=pixels, max_new_tokens=NEW_TOKENS, num_beams=BEAMS,
                         do_sample=False)[:, 1:].numpy()

  t = time.perf_counter()
  a = run_ours()  # compiles
  compile_s = time.perf_counter() - t
  b = run_hf()
  # Random weights over a 50k vocabulary leave near-ties that float rounding
  # decides differently; the share of identical captions says how rare they are.
  same = float(np.mean(np.all(a == b, axis=1)))

  def best(fn):
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return min(times)

  t_hf, t_ours = best(run_hf), best(run_ours)
  result = {
      "batch": BATCH, "num_beams": BEAMS, "new_tokens": NEW_TOKENS,
      "torch_threads": torch.get_num_threads(),
      "capjax_images_per_s": round(BATCH / t_ours, 2),
      "transformers_images_per_s": round(BATCH / t_hf, 2),
      "capjax_compile_s": round(compile_s, 1),
      "identical_captions_share": same,
      "speedup_vs_transformers": round(t_hf / t_ours, 2),
  }
  print(f"capjax {result['capjax_images_per_s']} images/s, transformers "
        f"{result['transformers_images_per_s']} images/s; identical captions: {same:.0%}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
