"""Fine-tuning ViT-B/16 + GPT-2 (124M) on COCO captions, Karpathy splits: the
successor of the old Flax example's recipe (google/vit-base-patch16-224-in21k
and gpt2, brought in with import-hf). docs/coco.md walks through it:

  capjax import-hf --encoder vit-base-patch16-224-in21k --decoder gpt2 \\
      --config configs/coco_vit_gpt2.py --out runs/vit_gpt2_init
  capjax prepare data/coco/dataset_coco.json --images data/coco --split train+restval \\
      --out data/coco/prepared/train
  capjax prepare data/coco/dataset_coco.json --images data/coco --split val \\
      --out data/coco/prepared/val
  capjax train --config configs/coco_vit_gpt2.py --workdir runs/coco_vit_gpt2

The architecture, tokenizer and image preprocessing come from
train.init_from; the model section below describes the same model, for runs
without it.
"""

from ml_collections import ConfigDict

from configs import demo


def get_config() -> ConfigDict:
  c = demo.get_config()
  c.data.train = "data/coco/prepared/train"
  c.data.eval = "data/coco/prepared/val"
  c.data.image_size = 224
  c.data.max_length = 32  # BOS/EOS included; 99.9% of COCO captions fit
  c.data.captions_per_image = 5  # every caption of an image in the step, one encoder pass
  c.data.worker_count = 8
  c.data.prefetch = 4

  c.tokenizer.path = ""  # from train.init_from (GPT-2's)

  c.model.dtype = "bfloat16"
  c.model.image_mean = (0.5, 0.5, 0.5)
  c.model.image_std = (0.5, 0.5, 0.5)
  c.model.encoder = ConfigDict(dict(
      hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
      image_size=224, patch_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
  c.model.decoder = ConfigDict(dict(
      vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))

  c.train.init_from = "runs/vit_gpt2_init"
  c.train.steps = 0
  c.train.epochs = 5.0  # as the old example: 5 epochs at 5e-5, linear decay
  c.train.batch_size = 64  # images per step (320 captions)
  c.train.learning_rate = 5e-5
  c.train.warmup_steps = 500
  c.train.schedule = "linear"
  c.train.weight_decay = 0.01
  c.train.b2 = 0.999
  c.train.log_every = 50

  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.best_metric = "cider"

  c.eval.every_steps = 2000
  c.eval.batch_size = 256
  c.eval.max_length = 32
  c.eval.num_beams = 4
  c.eval.content_accuracy = False

  c.mesh.data = -1  # 210M parameters: plain data parallelism on any chip count
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c
