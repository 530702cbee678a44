"""The old Flax example's train step, timed: `transformers` 4.57.6's
FlaxVisionEncoderDecoderModel (the last release with Flax models) trained as
run_image_captioning_flax.py trained it: pmap over the devices, float32
pixels normalised on the host, one-hot cross-entropy over the padding mask,
optax AdamW with its weight-decay mask, dropout on.

Runs only in the separate environment that bench/train_step.py builds (it
needs transformers < 5); prints one JSON line.

  bench/.seed-venv/bin/python bench/seed_step.py --encoder-json E --decoder-json D \\
    --batch 8 --length 32 --steps 3
"""

import argparse
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.training import train_state
from flax.training.common_utils import onehot
from transformers import (FlaxVisionEncoderDecoderModel, GPT2Config, ViTConfig,
                          VisionEncoderDecoderConfig)


class TrainState(train_state.TrainState):
  dropout_rng: jnp.ndarray


def loss_fn(logits, labels, padding_mask):
  # The old script's loss with label_smoothing_factor=0.
  loss = optax.softmax_cross_entropy(logits, onehot(labels, logits.shape[-1]))
  loss = (loss * padding_mask).sum()
  return loss, padding_mask.sum()


def train_step(state, batch):
  dropout_rng, new_dropout_rng = jax.random.split(state.dropout_rng)

  def compute_loss(params):
    labels = batch["labels"]
    logits = state.apply_fn(pixel_values=batch["pixel_values"],
                            decoder_input_ids=batch["decoder_input_ids"],
                            decoder_attention_mask=batch["decoder_attention_mask"],
                            params=params, dropout_rng=dropout_rng, train=True)[0]
    return loss_fn(logits, labels, batch["decoder_attention_mask"])

  (loss, num_labels), grad = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
  num_labels = jax.lax.psum(num_labels, "batch")
  loss = jax.lax.psum(loss, "batch") / num_labels
  grad = jax.tree_util.tree_map(lambda x: x / num_labels, jax.lax.psum(grad, "batch"))
  new_state = state.apply_gradients(grads=grad, dropout_rng=new_dropout_rng)
  return new_state, jax.lax.pmean({"loss": loss}, axis_name="batch")


def decay_mask_fn(params):
  # No weight decay on biases and layer norms, as the old script.
  flat = traverse_util.flatten_dict(params)
  norm = lambda path: any(n in "".join(path).lower() for n in ("layernorm", "layer_norm", "ln"))
  return traverse_util.unflatten_dict({p: p[-1] != "bias" and not norm(p) for p in flat})


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--encoder-json", required=True)
  p.add_argument("--decoder-json", required=True)
  p.add_argument("--batch", type=int, required=True)
  p.add_argument("--length", type=int, required=True)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--keep-freed-memory", action="store_true",
                 help="capjax's host-memory setting (trainer/host_memory.py), for comparison")
  args = p.parse_args()
  if args.keep_freed_memory:  # before JAX starts its threads
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from trainer import host_memory
    assert host_memory.share_one_arena()
  enc = ViTConfig(**json.load(open(args.encoder_json)))
  dec = GPT2Config(**json.load(open(args.decoder_json)), add_cross_attention=True,
                   is_decoder=True)
  config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
  model = FlaxVisionEncoderDecoderModel(config, seed=0, dtype=jnp.float32,
                                        input_shape=((1, enc.image_size, enc.image_size,
                                                      enc.num_channels), (1, 1)))
  tx = optax.adamw(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                   mask=decay_mask_fn)
  state = TrainState.create(apply_fn=model.__call__, params=model.params, tx=tx,
                            dropout_rng=jax.random.PRNGKey(0))
  devices = jax.local_device_count()
  state = jax.tree_util.tree_map(lambda x: jnp.stack([x] * devices), state)  # replicated
  p_step = jax.pmap(train_step, "batch", donate_argnums=(0,))
  rng = np.random.default_rng(0)
  per = args.batch // devices

  def batch():
    images = rng.integers(0, 256, (args.batch, enc.image_size, enc.image_size, 3), np.uint8)
    pixels = ((images / 255.0 - 0.5) / 0.5).astype(np.float32).transpose(0, 3, 1, 2)
    ids = rng.integers(0, dec.vocab_size, (args.batch, args.length + 1))
    b = {"pixel_values": pixels, "decoder_input_ids": ids[:, :-1].astype(np.int32),
         "labels": ids[:, 1:].astype(np.int32),
         "decoder_attention_mask": np.ones((args.batch, args.length), np.int32)}
    return {k: v.reshape(devices, per, *v.shape[1:]) for k, v in b.items()}

  for i in range(2):  # compile and warm up
    state, m = p_step(state, batch())
    jax.block_until_ready(m)
    if i == 0 and args.keep_freed_memory:
      host_memory.keep_freed_memory()  # as `capjax train` does after its first step
  times = []
  for _ in range(args.steps):
    host = batch()  # ready before the clock starts, as a loader would have it
    t = time.perf_counter()
    state, m = p_step(state, host)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_time = float(min(times))  # the fastest: this machine's speed drifts
  print(json.dumps({"step_time_s": step_time, "images_per_s": args.batch / step_time,
                    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                    "loss": float(m["loss"][0])}))


if __name__ == "__main__":
  main()
