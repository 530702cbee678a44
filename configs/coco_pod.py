"""A captioner trained from scratch on COCO at pod scale: ViT-B/16 encoder,
a 12-layer 768-wide decoder with its own BPE, every caption of an image in
the step behind one encoder pass, parameters and optimiser state sharded
(fsdp) across chips. See docs/scaling.md for meshes and throughput:

  launch/tpu.py --tpu NAME --zone ZONE --setup -- train \\
      --config configs/coco_pod.py --workdir /mnt/shared/runs/coco_pod \\
      --config.data.train=/mnt/shared/coco/train --config.data.eval=/mnt/shared/coco/val
"""

from ml_collections import ConfigDict

from configs import demo


def get_config() -> ConfigDict:
  c = demo.get_config()
  c.data.train = "data/coco/prepared/train"  # on a pod: a folder every host sees
  c.data.eval = "data/coco/prepared/val"
  c.data.image_size = 224
  c.data.crop_scale = 0.5  # random resized crops of 50-100% of the image
  c.data.max_length = 32
  c.data.captions_per_image = 5
  c.data.worker_count = 16
  c.data.prefetch = 4

  c.tokenizer.path = ""
  c.tokenizer.vocab_size = 16384  # BPE trained on the training captions

  c.model.dtype = "bfloat16"
  c.model.remat = "dots"  # keep matmul outputs, recompute the rest: more images per chip
  c.model.scan_layers = True
  c.model.encoder = ConfigDict(dict(
      hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
      image_size=224, patch_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
  c.model.decoder = ConfigDict(dict(
      vocab_size=0, n_positions=64, n_embd=768, n_layer=12, n_head=12,
      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))

  c.train.steps = 0
  c.train.epochs = 60.0  # 113k training images: ~6,600 steps
  c.train.batch_size = 1024  # images per step, all chips (5,120 captions)
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 500
  c.train.schedule = "cosine"
  c.train.weight_decay = 0.05
  c.train.b2 = 0.98
  c.train.label_smoothing = 0.1
  c.train.log_every = 50

  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.best_metric = "cider"

  c.eval.every_steps = 1000
  c.eval.batch_size = 1024
  c.eval.max_length = 32
  c.eval.num_beams = 3
  c.eval.content_accuracy = False

  c.mesh.data = -1
  c.mesh.fsdp = 4  # parameters and Adam state over 4 chips; data parallel across the rest
  c.mesh.tensor = 1
  return c
