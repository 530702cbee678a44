"""The encoder families beside ViT (DeiT, CLIP's and SigLIP's vision towers,
DINOv2 with and without registers and SwiGLU) against transformers' PyTorch
`VisionEncoderDecoderModel`, on tiny random models built here: logits, loss,
greedy and beam-search captions; import then export, weight for weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from pipeline import tokenizer as tokenizer_lib  # noqa: E402
from tests.test_hf import (CAPTIONS, _hf_model, _imported, _inputs, _load, _scan,  # noqa: E402
                           assert_logits_and_loss_match)
from trainer import generate  # noqa: E402
from trainer.hf import exporter, importer  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8)
WIDE = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8)
DINO = dict(mlp_ratio=2, layerscale_value=0.5)

# (name, the encoder's config class, its fields, image size to import at, layer
# layouts of the checkpoint and of the model it is loaded into). The first case
# of each family has the decoder's width; the second is wider than the decoder
# (a projection between them) and imported at another image size (its position
# embeddings interpolated once; DINOv2's PyTorch model interpolates at each call).
CASES = [
    ("deit", "DeiTConfig", dict(SMALL, intermediate_size=64), None, (False, False)),
    ("deit-wide-48px", "DeiTConfig", dict(WIDE, intermediate_size=96), 48, (True, True)),
    ("clip", "CLIPVisionConfig", dict(SMALL, intermediate_size=64), None, (False, True)),
    ("clip-wide-48px", "CLIPVisionConfig", dict(WIDE, intermediate_size=80, hidden_act="gelu"),
     48, (True, False)),
    ("siglip", "SiglipVisionConfig", dict(SMALL, intermediate_size=64), None, (False, False)),
    ("siglip-wide-48px", "SiglipVisionConfig", dict(WIDE, intermediate_size=96), 48,
     (True, True)),
    ("dinov2", "Dinov2Config", dict(SMALL, **DINO), None, (False, False)),
    ("dinov2-swiglu-wide-48px", "Dinov2Config", dict(WIDE, **DINO, use_swiglu_ffn=True), 48,
     (True, True)),
    ("dinov2-registers", "Dinov2WithRegistersConfig", dict(SMALL, **DINO, num_register_tokens=2),
     None, (False, True)),
    ("dinov2-registers-wide-48px", "Dinov2WithRegistersConfig",
     dict(WIDE, **DINO, num_register_tokens=3), 48, (True, False)),
]
DEC = dict(n_embd=32, n_layer=2, n_head=4)


def _model(tmp_path, cls, enc, seed=0, eos_boost=0.0, margin=0):
  """A random captioner of this encoder family, saved with a CLIP-style image
  processor: the shorter side to the image size plus `margin`, then the
  centre square of the image size."""
  hf, folder = _hf_model(tmp_path, enc, DEC, seed, eos_boost, getattr(transformers, cls))
  side = enc["image_size"]
  transformers.CLIPImageProcessor(
      size={"shortest_edge": side + margin}, crop_size={"height": side, "width": side},
      image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]).save_pretrained(folder)
  return hf, folder


def _encoder_kwargs(cls, image_size):
  """DINOv2 interpolates at every call and takes no such argument."""
  if cls.startswith("Dinov2") or image_size is None:
    return {}
  return {"interpolate_pos_encoding": True}


@pytest.mark.parametrize("name, cls, enc, image_size, scan", CASES, ids=[c[0] for c in CASES])
def test_captioner_matches_transformers(tmp_path, name, cls, enc, image_size, scan):
  hf, folder = _model(tmp_path, cls, enc, seed=4, eos_boost=4.0)
  cfg, graphdef, params = _imported(tmp_path, folder, image_size, scan)
  assert cfg.model.encoder.model_type == hf.config.encoder.model_type
  assert cfg.data.resize == "crop" and cfg.data.crop_fraction == 1.0
  size = image_size or enc["image_size"]
  images, ids, pixels = _inputs(cfg, size, batch=4, seed=5)
  model = nnx.merge(graphdef, params)
  kw = _encoder_kwargs(cls, image_size)

  assert_logits_and_loss_match(hf, graphdef, params, images, ids, pixels, **kw)

  d = cfg.model.decoder
  for beams in (1, 4):
    if beams == 1:
      tokens = generate.greedy(model, jnp.asarray(images), 12, d.bos_token_id, d.eos_token_id,
                               d.pad_token_id)
    else:
      tokens = generate.beam_search(model, jnp.asarray(images), 12, beams, d.bos_token_id,
                                    d.eos_token_id, d.pad_token_id, 1.0, False)
    with torch.no_grad():
      ref = hf.generate(pixel_values=pixels, max_new_tokens=12, num_beams=beams,
                        do_sample=False, length_penalty=1.0, early_stopping=False,
                        **kw)[:, 1:].numpy()
    ref = np.pad(ref, ((0, 0), (0, 12 - ref.shape[1])), constant_values=d.pad_token_id)
    np.testing.assert_array_equal(np.asarray(tokens), ref, err_msg=f"{beams} beams")


@pytest.mark.parametrize("name, cls, enc", [c[:3] for c in CASES[1::2]],
                         ids=[c[0] for c in CASES[1::2]])
def test_import_then_export_gives_every_weight_back(tmp_path, name, cls, enc):
  hf, folder = _model(tmp_path, cls, enc, seed=1, margin=4)
  cfg = importer.import_hf(str(tmp_path / "run"), hf_dir=str(folder), overrides=_scan(True))
  assert cfg.data.resize == "crop" and cfg.data.crop_fraction == pytest.approx(32 / 36)
  exporter.export_hf(str(tmp_path / "run"), str(tmp_path / "exported"))
  back = transformers.VisionEncoderDecoderModel.from_pretrained(tmp_path / "exported").eval()
  assert type(back.encoder) is type(hf.encoder)
  sd_a, sd_b = hf.state_dict(), back.state_dict()
  assert not set(sd_a) - set(sd_b) - {k for k in sd_a if "pooler" in k or ".head." in k}
  for k in sd_a:
    if "pooler" not in k and ".head." not in k:
      torch.testing.assert_close(sd_a[k], sd_b[k], rtol=0, atol=0, msg=k)
  processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "exported")
  assert processor.size == {"shortest_edge": 36}
  assert processor.crop_size == {"height": 32, "width": 32}


def test_a_processors_centre_crop_cuts_what_it_cuts():
  """`data.crop_fraction` (a processor's crop over its resize, e.g. DINOv2's
  224 of 256): the centre square of that share of the shorter side, so a
  frame the processor crops away is gone."""
  import io
  from PIL import Image
  from pipeline import images
  img = np.zeros((64, 80, 3), np.uint8)
  img[...] = (255, 0, 0)
  img[4:-4, 4:-4] = (0, 255, 0)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "PNG")
  whole = images.decode_and_resize(buf.getvalue(), 32, "crop", "bilinear")
  inner = images.decode_and_resize(buf.getvalue(), 32, "crop", "bilinear", crop_fraction=0.875)
  assert whole[0, :, 0].min() > 100 and whole[16, 16, 0] == 0  # the frame, then the inside
  assert inner[..., 0].max() == 0 and inner[..., 1].min() == 255
  with pytest.raises(ValueError, match="data.crop_fraction"):
    images.decode_and_resize(buf.getvalue(), 32, "crop", crop_fraction=1.5)


PROCESSORS = [  # (processor, its settings, the data config import-hf makes of them)
    ("ViTImageProcessor", dict(size={"height": 32, "width": 32}), ("squash", 1.0)),
    ("CLIPImageProcessor", dict(size={"shortest_edge": 36}, crop_size=32), ("crop", 32 / 36)),
    ("DeiTImageProcessor", dict(size={"height": 36, "width": 36}, crop_size=32),
     ("squash", 32 / 36)),
]


@pytest.mark.parametrize("cls, settings, expected", PROCESSORS, ids=[p[0] for p in PROCESSORS])
def test_imported_image_settings_preprocess_as_the_processor(tmp_path, cls, settings, expected):
  """A photo-like image through the Hugging Face processor and through the
  data config import-hf makes of it: the same pixels, but for the resampling
  filters' own rounding (PIL's against OpenCV's); and export-hf writes the
  processor back."""
  import io
  from PIL import Image
  from pipeline import images as images_lib
  from trainer import config as config_lib
  processor = getattr(transformers, cls)(resample=3, image_mean=[0.4, 0.5, 0.6],
                                         image_std=[0.2, 0.3, 0.25], **settings)
  cfg = config_lib.load("demo")
  importer._image_config(cfg, processor.to_dict(), 32, None)
  assert (cfg.data.resize, cfg.data.crop_fraction) == pytest.approx(expected)
  assert cfg.data.image_size == 32 and cfg.data.resample == "bicubic"
  y, x = np.mgrid[0:90, 0:120] / 90.0
  img = np.stack([np.sin(3 * x) * 0.5 + 0.5, y, np.cos(2 * x * y) * 0.5 + 0.5], -1)
  buf = io.BytesIO()
  Image.fromarray((img * 255).astype(np.uint8)).save(buf, "PNG")
  ref = processor(Image.open(io.BytesIO(buf.getvalue())), return_tensors="np")["pixel_values"][0]
  ours = images_lib.decode_and_resize(buf.getvalue(), 32, cfg.data.resize, cfg.data.resample,
                                      crop_fraction=cfg.data.crop_fraction)
  ours = (ours / 255.0 - np.array(cfg.model.image_mean)) / np.array(cfg.model.image_std)
  assert np.abs(ours.transpose(2, 0, 1) - ref).mean() < 0.03
  back = exporter.image_processor(cfg).to_dict()
  assert {k: back[k] for k in ("size", "crop_size", "do_center_crop") if k in settings} \
      == {k: processor.to_dict()[k] for k in ("size", "crop_size", "do_center_crop")
          if k in settings}


@pytest.mark.parametrize("whole", ["CLIPModel", "SiglipModel"])
def test_a_whole_image_text_model_gives_its_vision_tower(tmp_path, whole):
  """`import-hf --encoder` of a whole CLIP or SigLIP checkpoint (text tower
  and all) with a plain GPT-2 (no cross-attention: it is newly made): the
  vision tower's weights, the text tower left out, the processor's settings
  taken."""
  small = dict(SMALL, intermediate_size=64)
  prefix = whole.replace("Model", "")
  config = getattr(transformers, f"{prefix}Config")(
      vision_config=small, text_config=dict(hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64))
  torch.manual_seed(0)
  getattr(transformers, whole)(config).save_pretrained(tmp_path / "tower")
  transformers.CLIPImageProcessor(size={"shortest_edge": 36}, crop_size=32,
                                  image_mean=[0.4, 0.5, 0.6]).save_pretrained(tmp_path / "tower")
  tok = tokenizer_lib.train_bpe(CAPTIONS, 280, str(tmp_path / "gpt2"))
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=len(tok), n_positions=32, **DEC)).save_pretrained(tmp_path / "gpt2")
  cfg = importer.import_hf(str(tmp_path / "run"), encoder_dir=str(tmp_path / "tower"),
                           decoder_dir=str(tmp_path / "gpt2"))
  assert cfg.model.encoder.model_type == f"{prefix.lower()}_vision_model"
  assert cfg.data.crop_fraction == pytest.approx(32 / 36)
  assert tuple(cfg.model.image_mean) == pytest.approx((0.4, 0.5, 0.6))
  _, _, params = _load(tmp_path / "run")
  pure = nnx.to_pure_dict(params)
  saved = load_file(tmp_path / "tower" / "model.safetensors")
  np.testing.assert_array_equal(
      np.asarray(pure["encoder"]["layers"][1]["mlp"]["fc"]["kernel"]),
      saved["vision_model.encoder.layers.1.mlp.fc1.weight"].T)
  np.testing.assert_array_equal(np.asarray(pure["encoder"]["layernorm"]["scale"]),
                                saved["vision_model.post_layernorm.weight"])


# Each family as a tiny captioner of its own (no checkpoint): its
# distinguishing fields, and the names of its linear layers (LoRA's targets).
FAMILY_FIELDS = {
    "deit": {},
    "clip_vision_model": dict(hidden_act="quick_gelu"),
    "siglip_vision_model": dict(hidden_act="gelu_pytorch_tanh"),
    "dinov2": dict(use_swiglu_ffn=True, layerscale_value=0.5),
    "dinov2_with_registers": dict(num_register_tokens=2, layerscale_value=0.5),
    "blip_vision_model": dict(layer_norm_eps=1e-5),
}
ENCODER_LAYERS = sorted(f"encoder/layers/{i}/{m}/{n}/lora_{ab}" for i in range(2) for ab in "ab"
                        for m, n in [("attention", "query"), ("attention", "key"),
                                     ("attention", "value"), ("attention", "out"),
                                     ("mlp", "fc"), ("mlp", "proj")])


def _family_captioner(model_type, dtype=jnp.float32, remat="none", scan=False, lora_rank=0):
  from trainer import config as config_lib
  from trainer.models.captioner import build_captioner
  cfg = config_lib.load("demo")
  cfg.model.encoder = dict(model_type=model_type, hidden_size=48, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=96, image_size=32,
                           patch_size=8, **FAMILY_FIELDS[model_type])
  cfg.model.decoder.update(vocab_size=60, n_positions=16, n_embd=32, n_layer=2, n_head=4)
  cfg.model.update(dtype={jnp.float32: "float32", jnp.bfloat16: "bfloat16"}[dtype],
                   remat=remat, scan_layers=scan)
  cfg.model.lora.rank = lora_rank
  return build_captioner(cfg.model, seed=0)


@pytest.mark.parametrize("model_type", list(FAMILY_FIELDS))
def test_every_family_takes_what_vit_takes(model_type):
  """Scanned and rematerialised layers, LoRA's default targets, bfloat16
  compute and XLA's FLOPs count (the logged MFU) work for every family as for
  ViT: the same loss and gradients, adapters on every encoder projection."""
  from trainer import flops as flops_lib, optim
  from trainer.models import lora
  from trainer.params import to_layout
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
  ids = jnp.asarray(rng.integers(0, 60, (2, 3, 6)), jnp.int32)

  def loss_and_grads(model):
    """Of the encoder alone (in the decoder's width): the families differ there."""
    graphdef, params = nnx.split(model)
    weights = jax.random.normal(jax.random.key(1), (2, 20, 32))

    def loss(p):
      states = nnx.merge(graphdef, p).encode(images)
      return jnp.mean(states * weights[:, :states.shape[1]])

    return jax.jit(jax.value_and_grad(loss))(params)

  plain = _family_captioner(model_type)
  loss, grads = loss_and_grads(plain)
  scanned = _family_captioner(model_type, remat="full", scan=True)
  pure = to_layout(nnx.to_pure_dict(nnx.state(plain, nnx.Param)), True)
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(scanned, state)
  loss_s, grads_s = loss_and_grads(scanned)
  assert float(loss_s) == pytest.approx(float(loss), rel=1e-6)
  grads_s = to_layout(nnx.to_pure_dict(grads_s), False)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(grads)), jax.tree.leaves(grads_s)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  # bfloat16 compute with fresh adapters (the default targets): float32
  # parameters, the float32 loss within bfloat16's error.
  adapted = _family_captioner(model_type, jnp.bfloat16, lora_rank=2)
  names = [optim.param_name(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(nnx.state(adapted, nnx.Param))[0]]
  assert sorted(n for n in names if lora.is_adapter(n) and n.startswith("encoder/")) \
      == ENCODER_LAYERS
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(adapted, nnx.Param)))
  nll = nnx.jit(lambda m: jnp.mean(jax.nn.log_softmax(m(images, ids).astype(jnp.float32))[..., 0]))
  assert float(nll(adapted)) == pytest.approx(float(nll(plain)), rel=0.02)

  # XLA's count of the encoder's forward pass against its matrix products.
  e = plain.encoder.cfg
  d, t, p = e.hidden_size, plain.encoder.position_embeddings.shape[1], e.patch_size
  t += e.num_register_tokens
  fc_out = 2 * e.mlp_width if e.use_swiglu_ffn else e.mlp_width
  per_layer = t * (4 * d * d + d * fc_out + e.mlp_width * d) + 2 * t * t * d
  matmuls = 2 * 2 * (e.num_hidden_layers * per_layer + (32 // p) ** 2 * p * p * 3 * d)
  pixels = jnp.zeros((2, 32, 32, 3), jnp.float32)
  counted = flops_lib.step_flops(jax.jit(lambda x: plain.encoder(x)).lower(pixels), 1)
  assert matmuls <= counted <= 1.25 * matmuls, (counted, matmuls)
