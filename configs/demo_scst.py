"""Self-critical sequence training of the demo's model: the second stage of
every strong COCO recipe, on the demo's data. After `make demo`:

  capjax train --config configs/demo_scst.py --workdir runs/demo_scst

It starts from the cross-entropy run in runs/demo and trains on the CIDEr-D
of 8 captions sampled per image (from the 3 likeliest tokens at each step),
each against the mean reward of the image's other samples; the five
captions of each training image are the references. The validation split is
captioned and scored at the end. On this demo it raises the sampled
captions' reward but not yet the greedy captions' scores: the README gives
the figures measured.
"""

from ml_collections import ConfigDict

from configs import demo


def get_config() -> ConfigDict:
  c = demo.get_config()
  c.train.init_from = "runs/demo"
  c.train.objective = "scst"
  c.train.scst.update(samples=8, temperature=1.0, top_k=3, max_length=24, baseline="mean")
  c.data.captions_per_image = 5  # every reference of an image
  c.train.steps = 400
  c.train.batch_size = 32
  c.train.learning_rate = 2e-5
  c.train.warmup_steps = 0
  c.train.schedule = "constant"
  c.train.log_every = 50
  c.checkpoint.every_steps = 200
  c.eval.every_steps = 400
  return c
