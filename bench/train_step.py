"""Train-step speed and memory, against the old Flax example's model, and the
share of step time spent waiting for data with the real input pipeline.

  demo            the demo config's model (configs/demo.py), its batch of 64
                  images with 2 captions each, 64 px;
  vit_b16_gpt2    ViT-B/16 (224 px) + GPT-2 (124M, 50,257 tokens), batch 8,
                  one 32-token caption per image, dropout as the pretrained
                  configs set it (GPT-2's 0.1, none in ViT), as in the seed;
  vit_b16_gpt2_lora  the same with rank-8 LoRA adapters on every linear
                  layer (configs/demo.py's default targets), only they trained;
  seed            the same ViT-B/16 + GPT-2 in transformers 4.57.6's
                  FlaxVisionEncoderDecoderModel, trained as
                  run_image_captioning_flax.py trained it (bench/seed_step.py),
                  in a separate environment this bench builds once in
                  bench/.seed-venv (transformers < 5, the same jax and flax);
  seed, same host memory  the seed with capjax's host-memory setting
                  (trainer/host_memory.py, which `capjax train` applies on the
                  CPU and the capjax models here run with): the old step's own
                  speed without the page faults of its scratch memory;
  data wait       `capjax train --config demo` for 60 steps on synthetic data
                  with one Grain worker: train/data_wait_fraction after the
                  first logged window.

Each model is timed in a fresh process (the fastest of `--steps` steps after
two warm-up steps, float32, random weights and inputs; the host's batch is
ready before the clock starts) whose peak resident memory is its high-water
mark. ViT-B/16 + GPT-2 and the seed are timed in alternating rounds and the
best round of each kept: this machine's speed drifts by a fifth from one
minute to the next. Each model reports its optimiser state's bytes. The last
line is one JSON object with the figures, `data_wait_fraction`,
`speedup_vs_seed`, `memory_vs_seed`, `speedup_vs_seed_same_host_memory`,
`lora_opt_state_smaller` (full fine-tuning's optimiser state over LoRA's) and
`lora_step_time_vs_full` among them.

  .venv/bin/python bench/train_step.py [--steps 3] [--rounds 2] [--skip-seed]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SEED_VENV = os.path.join(ROOT, "bench", ".seed-venv")
SEED_TRANSFORMERS = "transformers==4.57.6"
# Both models read these; dropout as the pretrained checkpoints' configs set it
# (none in ViT, 0.1 in GPT-2), so both steps do the same dropout work.
VIT_B16 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, image_size=224, patch_size=16,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GPT2_124M = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
MODELS = {
    "demo": {},  # configs/demo.py as it is
    "vit_b16_gpt2": dict(batch=8, captions=1, length=32, encoder=VIT_B16, decoder=GPT2_124M),
    "vit_b16_gpt2_lora": dict(batch=8, captions=1, length=32, encoder=VIT_B16,
                              decoder=GPT2_124M, lora_rank=8),
}


def _config(name: str):
  from configs import demo

  m = MODELS[name]
  cfg = demo.get_config()
  if "encoder" in m:
    cfg.model.encoder.update(m["encoder"])
    cfg.model.decoder.update(m["decoder"])
    cfg.data.image_size = m["encoder"]["image_size"]
    cfg.train.batch_size = m["batch"]
    cfg.data.captions_per_image = m["captions"]
    cfg.data.max_length = m["length"]
    cfg.model.lora.rank = m.get("lora_rank", 0)
  else:
    cfg.model.decoder.vocab_size = cfg.tokenizer.vocab_size
  d = cfg.model.decoder
  d.bos_token_id = d.eos_token_id = d.pad_token_id = 0
  return cfg


def measure(name: str, steps: int) -> dict:
  """One model's step, in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from trainer import host_memory, sharding, step as step_lib

  cfg = _config(name)
  mesh = sharding.make_mesh(cfg.mesh)
  setup = step_lib.setup(cfg, mesh)
  params, opt = setup.init()
  b, k, n = cfg.train.batch_size, cfg.data.captions_per_image, cfg.data.max_length
  rng = np.random.default_rng(0)
  size, vocab = cfg.data.image_size, cfg.model.decoder.vocab_size

  def batch():
    ids = rng.integers(0, vocab, (b, k, n + 1)).astype(np.int32)
    local = {"image": rng.integers(0, 256, (b, size, size, 3), np.uint8),
             "input_ids": ids[..., :-1], "labels": ids[..., 1:],
             "loss_mask": np.ones((b, k, n), np.float32), "skipped": np.zeros((b,), np.int32)}
    return sharding.global_batch(local, mesh)

  # Placed as the step returns them, so the second call reuses the first's compilation.
  step, ok = (jax.device_put(v, sharding.replicated(mesh))
              for v in (jnp.int32(0), jnp.bool_(True)))
  times = []
  for i in range(steps + 2):
    x = batch()
    jax.block_until_ready(x)
    t = time.perf_counter()
    params, opt, step, _, metrics = setup.train_step(params, opt, step, ok, x)
    jax.block_until_ready(metrics)
    if i == 0:
      host_memory.keep_freed_memory()  # as `capjax train` does after its first step
    if i >= 2:
      times.append(time.perf_counter() - t)
  step_time = float(min(times))  # the fastest: this machine's speed drifts
  return {"step_time_s": round(step_time, 3), "images_per_s": round(b / step_time, 3),
          "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
          "opt_state_bytes": sum(x.nbytes for x in jax.tree.leaves(opt)),
          "params": sum(x.size for x in jax.tree.leaves(params)),
          "batch": b, "captions_per_image": k, "tokens": n}


def _run_json(cmd: list[str], env=None) -> dict:
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                        env={**os.environ, **(env or {})})
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def seed_environment() -> str:
  """bench/.seed-venv with transformers 4.57.6 and this environment's jax,
  jaxlib, flax and optax; its python."""
  from importlib.metadata import version

  python = os.path.join(SEED_VENV, "bin", "python")
  if not os.path.exists(os.path.join(SEED_VENV, ".ready")):
    subprocess.run([sys.executable, "-m", "venv", SEED_VENV], check=True)
    pins = [SEED_TRANSFORMERS] + [f"{p}=={version(p)}" for p in ("jax", "jaxlib", "flax",
                                                                  "optax", "numpy")]
    print(f"building {SEED_VENV}: {' '.join(pins)}", flush=True)
    proc = subprocess.run([python, "-m", "pip", "install", "-q", *pins], capture_output=True,
                          text=True)
    if proc.returncode:
      raise RuntimeError(f"pip install {' '.join(pins)} failed:\n{proc.stderr[-3000:]}")
    open(os.path.join(SEED_VENV, ".ready"), "w").close()
  return python


def data_wait_fraction() -> float:
  """The demo config with the real pipeline: the share of step time the
  trainer waited for its next batch, after the first logged window."""
  with tempfile.TemporaryDirectory() as tmp:
    from pipeline import synthetic
    synthetic.generate(os.path.join(tmp, "coco"), num_train=1024, num_val=8, seed=0,
                       processes=2)
    cli = [sys.executable, "-m", "trainer.cli"]
    for split in ("train", "val"):
      subprocess.run(cli + ["prepare", os.path.join(tmp, "coco", "annotations",
                                                    f"captions_{split}.json"),
                            "--images", os.path.join(tmp, "coco", split),
                            "--out", os.path.join(tmp, split)],
                     check=True, capture_output=True, cwd=ROOT)
    subprocess.run(cli + ["train", "--config", "demo", "--workdir", os.path.join(tmp, "run"),
                          f"--config.data.train={tmp}/train", f"--config.data.eval={tmp}/val",
                          "--config.train.steps=60", "--config.train.log_every=20"],
                   check=True, capture_output=True, cwd=ROOT)
    rows = [json.loads(l) for l in open(os.path.join(tmp, "run", "metrics.jsonl"))]
    waits = [r["train/data_wait_fraction"] for r in rows
             if "train/data_wait_fraction" in r and r["step"] > 20]
    return sum(waits) / len(waits)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=3, help="timed steps per model (default: 3)")
  p.add_argument("--rounds", type=int, default=2, help="alternating rounds of ViT-B/16 + "
                 "GPT-2, with LoRA, and the seed, the best of each kept (default: 2)")
  p.add_argument("--skip-seed", action="store_true", help="leave out the old model")
  p.add_argument("--measure", choices=sorted(MODELS), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.measure:  # a child process: one model, run as `capjax train` runs it
    from trainer import host_memory
    host_memory.share_one_arena()  # before JAX starts its threads
    print(json.dumps(measure(args.measure, args.steps)))
    return

  here = [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps)]
  result = {"demo": _run_json(here + ["--measure", "demo"])}
  print(f"demo: {result['demo']}", flush=True)
  m = MODELS["vit_b16_gpt2"]
  with tempfile.TemporaryDirectory() as tmp:
    enc, dec = os.path.join(tmp, "enc.json"), os.path.join(tmp, "dec.json")
    json.dump(m["encoder"], open(enc, "w"))
    json.dump(m["decoder"], open(dec, "w"))
    runs = {name: here + ["--measure", name] for name in ("vit_b16_gpt2", "vit_b16_gpt2_lora")}
    if not args.skip_seed:
      runs["seed"] = [seed_environment(), os.path.join(ROOT, "bench", "seed_step.py"),
                      "--encoder-json", enc, "--decoder-json", dec, "--batch", str(m["batch"]),
                      "--length", str(m["length"]), "--steps", str(args.steps)]
      runs["seed_same_host_memory"] = runs["seed"] + ["--keep-freed-memory"]
    for r in range(args.rounds):
      for name, cmd in runs.items():
        got = _run_json(cmd)
        print(f"round {r + 1}, {name}: {got}", flush=True)
        if name not in result or got["step_time_s"] < result[name]["step_time_s"]:
          result[name] = got
  if not args.skip_seed:
    ours, seed = result["vit_b16_gpt2"], result["seed"]
    result["speedup_vs_seed"] = round(ours["images_per_s"] / seed["images_per_s"], 2)
    result["memory_vs_seed"] = round(ours["peak_rss_gib"] / seed["peak_rss_gib"], 2)
    result["speedup_vs_seed_same_host_memory"] = round(
        ours["images_per_s"] / result["seed_same_host_memory"]["images_per_s"], 2)
  full, adapted = result["vit_b16_gpt2"], result["vit_b16_gpt2_lora"]
  result["lora_opt_state_smaller"] = round(full["opt_state_bytes"] / adapted["opt_state_bytes"], 1)
  result["lora_step_time_vs_full"] = round(adapted["step_time_s"] / full["step_time_s"], 2)
  result["data_wait_fraction"] = round(data_wait_fraction(), 4)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
