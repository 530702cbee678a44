"""Fine-tuning SigLIP's vision tower (google/siglip-base-patch16-224) + GPT-2
(124M) on COCO captions, Karpathy splits. docs/coco.md walks through it and
says when to pick this encoder over ViT-in21k, CLIP or DINOv2:

  capjax import-hf --encoder siglip-base-patch16-224 --decoder gpt2 \\
      --config configs/coco_siglip_gpt2.py --out runs/siglip_gpt2_init
  capjax train --config configs/coco_siglip_gpt2.py --workdir runs/coco_siglip_gpt2

The whole SigLIP checkpoint imports (its text tower and pooling head are left
out), and with it its image settings: 224 x 224 without a crop, bicubic,
mean and std 0.5. The architecture, tokenizer and image preprocessing come
from train.init_from; the model section below describes the same model, for
runs without it. Other SigLIP towers (e.g. so400m-patch14-384, 428M) import
the same way; see docs/coco.md for their memory.
"""

from ml_collections import ConfigDict

from configs import coco_vit_gpt2


def get_config() -> ConfigDict:
  c = coco_vit_gpt2.get_config()
  c.data.resize = "squash"  # SiglipImageProcessor: straight to 224 x 224
  c.data.resample = "bicubic"
  c.model.image_mean = (0.5, 0.5, 0.5)
  c.model.image_std = (0.5, 0.5, 0.5)
  # No class token: the decoder attends to the 196 patch tokens.
  c.model.encoder = ConfigDict(dict(
      model_type="siglip_vision_model", hidden_size=768, num_hidden_layers=12,
      num_attention_heads=12, intermediate_size=3072, hidden_act="gelu_pytorch_tanh",
      layer_norm_eps=1e-6, image_size=224, patch_size=16))
  # The rest is the ViT + GPT-2 recipe: 5 epochs at 5e-5, linear decay,
  # bfloat16, 64 images (320 captions) a step, CIDEr-D with 4 beams.
  c.train.init_from = "runs/siglip_gpt2_init"
  return c
