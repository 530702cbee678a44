"""The demo config shrunk to seconds: for tests and smoke runs."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
import demo  # noqa: E402


def get_config():
  c = demo.get_config()
  c.data.image_size = 32
  c.data.max_length = 24
  c.data.captions_per_image = 3
  c.data.worker_count = 0
  c.tokenizer.vocab_size = 300
  c.model.encoder.update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, image_size=32, patch_size=8)
  c.model.decoder.update(n_positions=32, n_embd=32, n_layer=1, n_head=2)
  c.train.steps = 6
  c.train.batch_size = 8
  c.train.warmup_steps = 2
  c.train.log_every = 2
  c.checkpoint.every_steps = 3
  c.eval.batch_size = 8
  c.eval.max_length = 12
  return c
