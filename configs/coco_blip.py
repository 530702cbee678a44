"""Fine-tuning BLIP (Salesforce/blip-image-captioning-base: ViT-B/16 at 384 px
and BLIP's BERT text decoder, 224M parameters) on COCO captions, Karpathy
splits, as BLIP's own COCO captioning recipe does (caption_coco.yaml):
prompt "a picture of ", label smoothing 0.1, 5 epochs at 1e-5 with a cosine
decay, weight decay 0.05, 3 beams. docs/coco.md compares it with the
ViT + GPT-2 recipe:

  capjax import-hf blip-image-captioning-base --config configs/coco_blip.py \\
      --out runs/blip_init
  capjax train --config configs/coco_blip.py --workdir runs/coco_blip

The architecture, tokenizer ([DEC] start, [SEP] end) and image preprocessing
(384 x 384, bicubic, CLIP's mean and std) come from train.init_from; the
model section below describes the same model, for runs without it. The
-large checkpoint (ViT-L/16, 470M) imports the same way.

Memory: parameters, gradients and Adam's two moments in float32 take 16
bytes a parameter, 3.6 GB, held whole on each chip with the data parallelism
below. On chips with little memory (a v5e's 16 GB) or for larger batches,
shard them: `--config.mesh.fsdp=-1 --config.mesh.data=1`, and
`--config.model.remat=full` (docs/coco.md#blip).
"""

from ml_collections import ConfigDict

from configs import coco_vit_gpt2


def get_config() -> ConfigDict:
  c = coco_vit_gpt2.get_config()
  c.data.image_size = 384
  c.data.resize = "squash"  # BlipImageProcessor: straight to 384 x 384
  c.data.resample = "bicubic"
  c.data.crop_scale = 0.5  # BLIP trains on random resized crops of 50-100% of the image
  c.data.max_length = 40  # [DEC], the prompt's 3 tokens, the caption and [SEP]
  c.model.image_mean = (0.48145466, 0.4578275, 0.40821073)
  c.model.image_std = (0.26862954, 0.26130258, 0.27577711)
  c.model.prompt = "a picture of "
  c.model.encoder = ConfigDict(dict(
      model_type="blip_vision_model", hidden_size=768, num_hidden_layers=12,
      num_attention_heads=12, intermediate_size=3072, image_size=384, patch_size=16,
      layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
  c.model.decoder = ConfigDict(dict(
      model_type="blip_text_model", vocab_size=30524, hidden_size=768, encoder_hidden_size=768,
      intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
      max_position_embeddings=512, layer_norm_eps=1e-12, bos_token_id=30522,
      eos_token_id=102, pad_token_id=0, sep_token_id=102))

  c.train.init_from = "runs/blip_init"
  c.train.epochs = 5.0
  c.train.batch_size = 256  # 8 chips x 32 images, as BLIP's 8 GPUs
  c.train.learning_rate = 1e-5
  c.train.warmup_steps = 0
  c.train.schedule = "cosine"
  c.train.weight_decay = 0.05
  c.train.label_smoothing = 0.1

  c.eval.max_length = 20  # generated tokens, after the prompt
  c.eval.num_beams = 3
  return c
