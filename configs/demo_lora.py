"""LoRA fine-tuning of the demo model on a new domain: the synthetic shapes in
four colours the demo never saw (pink, brown, cyan, lime). Rank-8 adapters on
every attention projection and MLP of the encoder and the decoder train; the
demo's weights stay as they are. After `make demo`:

  python -m pipeline.synthetic data/held-out/coco --palette held-out \\
      --train 2000 --val 500 --seed 1
  capjax prepare data/held-out/coco/annotations/captions_train.json \\
      --images data/held-out/coco/train --out data/held-out/prepared/train
  capjax prepare data/held-out/coco/annotations/captions_val.json \\
      --images data/held-out/coco/val --out data/held-out/prepared/val
  capjax train --config configs/demo_lora.py --workdir runs/demo_lora

(`make lora-demo` runs these.) Full fine-tuning for comparison:

  capjax train --config configs/demo_lora.py --config.model.lora.rank=0 \\
      --config.train.learning_rate=1e-3 --workdir runs/demo_full
"""

from ml_collections import ConfigDict

from configs import demo


def get_config() -> ConfigDict:
  c = demo.get_config()
  c.data.train = "data/held-out/prepared/train"
  c.data.eval = "data/held-out/prepared/val"
  # The demo's model, tokenizer and image settings, with a fresh optimiser.
  c.train.init_from = "runs/demo"
  c.model.lora.update(rank=8, alpha=16.0, dropout=0.0)
  c.train.steps = 300
  c.train.learning_rate = 1e-2
  c.train.warmup_steps = 30
  c.checkpoint.every_steps = 100
  return c
