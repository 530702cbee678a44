"""The second stage of the COCO recipe: self-critical sequence training of
the cross-entropy run of configs/coco_vit_gpt2.py (or of any captioner, an
imported one included) on CIDEr-D, as the published recipes end (docs/coco.md):

  capjax train --config configs/coco_scst.py --workdir runs/coco_scst

5 captions sampled per image, the baseline the mean reward of the image's
other 4 ("new self-critical", Luo 2020), rewards CIDEr-D with document
frequencies from the training references (computed once into the run
directory), a small constant learning rate, CIDEr-D on the validation split
every 2,000 steps and the best model kept. The architecture, tokenizer and
image settings come from train.init_from.
"""

from ml_collections import ConfigDict

from configs import coco_vit_gpt2


def get_config() -> ConfigDict:
  c = coco_vit_gpt2.get_config()
  c.train.init_from = "runs/coco_vit_gpt2/best"
  c.train.objective = "scst"
  c.train.scst.update(samples=5, temperature=1.0, top_p=1.0, top_k=0, max_length=20,
                      baseline="mean", bleu_weight=0.0)
  c.data.captions_per_image = 5  # COCO's five references
  c.train.epochs = 10.0
  c.train.batch_size = 64  # images a step (320 sampled captions)
  c.train.learning_rate = 5e-6  # constant, as M2 Transformer's CIDEr stage
  c.train.warmup_steps = 0
  c.train.schedule = "constant"
  return c
