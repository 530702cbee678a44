"""The demo: a small ViT + GPT-2 captioner trained from scratch on the
embedded synthetic shapes data, on the CPU, in about eight minutes.

  capjax train --config configs/demo.py --workdir runs/demo
  capjax train --config configs/demo.py --config.train.steps=100 --workdir /tmp/x
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0

  c.data = ConfigDict()
  # Folders written by `capjax prepare`, or any source it reads (tfds:NAME,
  # hf:FOLDER, a COCO/Karpathy JSON, a table); splits and options below.
  # data.train may be a mixture, [(source, weight), ...] or [(name, source,
  # weight), ...] (see pipeline/mixture.py): typed `object` so that a config
  # built on this one can set either.
  c.data.train = config_dict.FieldReference("data/demo/prepared/train", field_type=object)
  c.data.eval = "data/demo/prepared/val"
  c.data.train_split = "train"  # for sources with splits (tfds, hf, Karpathy)
  c.data.eval_split = "val"
  c.data.source = ConfigDict(dict(
      images="",  # COCO/Karpathy image root
      data_dir="",  # TFDS data directory
      image_key="image", captions_key="captions/text", id_key="image/id",  # TFDS features
      image_column="image", caption_column="caption"))  # tables, hf
  c.data.image_size = 64
  c.data.resize = "crop"  # shorter side + centre crop, or "squash"
  c.data.crop_fraction = 1.0  # centre kept: of the shorter side ("crop"), each side ("squash")
  c.data.resample = "auto"  # area to shrink 2x+, bilinear less, bicubic to enlarge; or a filter
  c.data.crop_scale = 0.0  # >0: random resized crops of this much to all of the area (training)
  c.data.bad_records = "skip"  # unusable records: "skip" (counted in the metrics) or "fail"
  c.data.max_length = 24  # decoder tokens, BOS/EOS included
  # Captions decoded per image per step, drawn afresh from its five each time:
  # the encoder runs once for all of them. Two, with 64 images a step, buys
  # more accuracy per CPU-minute than five with 32 (the encoder must see many
  # images to tell shapes apart).
  c.data.captions_per_image = 2
  c.data.worker_count = 1  # Grain worker processes (0: in the main process)
  c.data.prefetch = 4  # batches buffered per worker

  c.tokenizer = ConfigDict()
  c.tokenizer.path = ""  # a Hugging Face tokenizer folder; empty: train a BPE
  c.tokenizer.vocab_size = 384  # of the BPE trained on the training captions

  c.model = ConfigDict()
  c.model.dtype = "float32"  # compute dtype ("bfloat16"); parameters stay float32
  c.model.remat = "none"  # recompute activations in the backward pass: "full" or "dots"
  # "xla", "dot_product" (cuDNN's fused kernel on GPUs), "splash" (the TPU
  # kernel, one chip); "auto": dot_product on GPUs, xla elsewhere.
  c.model.attention = "auto"
  # One compiled layer scanned over stacked weights: compile time independent
  # of depth (deep models); checkpoints load into either layout.
  c.model.scan_layers = False
  # LoRA adapters (rank > 0) beside the linear layers whose names match
  # `targets`: by default all of them (attention projections, MLPs,
  # enc_to_dec_proj); "^decoder/.*attn/(query|value)$" picks fewer. With
  # them only the adapters train (and what train.trainable adds), and
  # `export-hf` merges them into the weights.
  c.model.lora = ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0,
                                 targets=r"(query|key|value|out|fc|proj)$"))
  # Text every caption continues (BLIP's "a picture of "): trained after [BOS]
  # with no loss on its tokens, forced before decoding, left out of the
  # captions written. `--prompt` on train, eval, predict and caption sets it.
  c.model.prompt = ""
  c.model.image_mean = (0.5, 0.5, 0.5)
  c.model.image_std = (0.5, 0.5, 0.5)
  # model_type: vit, deit, clip_vision_model, siglip_vision_model, dinov2 or
  # dinov2_with_registers (trainer/models/vit.py); import-hf fills it in.
  c.model.encoder = ConfigDict(dict(
      model_type="vit", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
      intermediate_size=512, image_size=64, patch_size=8,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
  c.model.decoder = ConfigDict(dict(
      vocab_size=0,  # 0: the tokenizer's size
      n_positions=32, n_embd=128, n_layer=2, n_head=4,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # dropout: as GPT-2's 0.1 when unset

  c.train = ConfigDict()
  c.train.steps = 850
  c.train.epochs = 0.0  # >0: as many steps as this many passes over the training records
  c.train.batch_size = 64  # images per step, all processes together
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 100
  c.train.schedule = "cosine"  # or "linear", "rsqrt", "constant"
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.mu_dtype = "float32"  # Adam's first moment; "bfloat16": a quarter less state
  c.train.grad_clip = 1.0
  # Regular expressions over parameter names (encoder/layers/0/mlp/fc/kernel):
  # only trainable parameters move and hold optimiser state. trainable empty:
  # all of them, or with LoRA the adapters alone (it adds to them, e.g.
  # "/ln_|layernorm"); freeze wins over both (e.g. "^encoder/").
  c.train.trainable = ""
  c.train.freeze = ""
  c.train.accum_steps = 1  # >1: the batch in this many micro-batches, gradients summed
  c.train.label_smoothing = 0.0
  # "xent": cross-entropy on the references; "scst": self-critical sequence
  # training (trainer/scst.py), the reward CIDEr-D (+ bleu_weight x BLEU-4) of
  # `samples` captions drawn per image, against the mean of the image's other
  # samples ("mean") or its greedy caption's ("greedy"). The batch's captions
  # (captions_per_image of them) are the references; xent_weight > 0 adds
  # their cross-entropy, each token weighted by it.
  c.train.objective = "xent"
  c.train.scst = ConfigDict(dict(samples=5, temperature=1.0, top_p=1.0, top_k=0,
                                 max_length=24, baseline="mean", bleu_weight=0.0,
                                 xent_weight=0.0))
  c.train.nonfinite = "stop"  # a non-finite loss: "stop" (last good state kept) or "skip" the step
  c.train.log_every = 20
  c.train.peak_flops = 0.0  # one device's peak FLOP/s for MFU; 0: known TPUs and GPUs only
  # A checkpoint to start from (e.g. a run directory written by import-hf):
  # its model, tokenizer and image settings, with a fresh optimiser.
  c.train.init_from = ""

  c.checkpoint = ConfigDict()
  c.checkpoint.every_steps = 250
  c.checkpoint.keep = 2
  # With eval.every_steps: keep the model scoring highest on this eval metric
  # (e.g. "cider") in WORKDIR/best; empty: no best model.
  c.checkpoint.best_metric = ""

  c.eval = ConfigDict()
  c.eval.every_steps = 0  # >0: caption and score the eval split every this many steps
  c.eval.batch_size = 100
  c.eval.max_length = 24  # generated tokens
  c.eval.num_beams = 1  # 1: greedy
  c.eval.length_penalty = 1.0  # beam search: score = log-prob / length ** this
  c.eval.early_stopping = "false"  # beam search: "true", "false" or "never", as in transformers
  c.eval.no_repeat_ngram_size = 0  # >0: never repeat an n-gram of this size, as in transformers
  c.eval.num_samples = 3  # captions printed at the end
  c.eval.content_accuracy = True  # parse captions with the synthetic grammar

  c.mesh = ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = (
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("norm", None),
      ("layers", None),  # the stacked-layer axis of scan_layers
  )
  return c
