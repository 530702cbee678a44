"""Self-critical sequence training of the demo's model: the second stage of
every strong COCO recipe, on the demo's data. After `make demo`:

  capjax train --config configs/demo_scst.py --workdir runs/demo_scst

It starts from the cross-entropy run in runs/demo and trains on the CIDEr-D
of 5 captions sampled per image from the model's softmax, each against the
mean reward of the image's other 4 (as configs/coco_scst.py), with the
cross-entropy of the image's five references mixed in at weight 1: on this
small model, SCST alone swings from one evaluation to the next (the README
has both). The validation split is captioned and scored every 250 steps,
and the model scoring the highest CIDEr-D is kept in runs/demo_scst/best.
"""

from ml_collections import ConfigDict

from configs import demo


def get_config() -> ConfigDict:
  c = demo.get_config()
  c.train.init_from = "runs/demo"
  c.train.objective = "scst"
  c.train.scst.update(samples=5, temperature=1.0, top_p=1.0, top_k=0, max_length=24,
                      baseline="mean", xent_weight=1.0)
  c.data.captions_per_image = 5  # every reference of an image
  c.train.steps = 1000
  c.train.batch_size = 32
  c.train.learning_rate = 5e-5
  c.train.warmup_steps = 0
  c.train.schedule = "constant"
  c.train.log_every = 250
  c.checkpoint.every_steps = 500
  c.checkpoint.best_metric = "cider"
  c.eval.every_steps = 250
  return c
