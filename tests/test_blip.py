"""BLIP captioners against transformers' PyTorch `BlipForConditionalGeneration`
on tiny random models built here (a BERT tokenizer with BLIP's [DEC] token):
logits, loss (with label smoothing too), greedy and beam-search captions
with and without a prompt; import then export, weight for weight."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.test_hf import CAPTIONS, _inputs, _load, _scan  # noqa: E402
from trainer import generate  # noqa: E402
from trainer.hf import exporter, importer  # noqa: E402
from trainer.step import loss_fn  # noqa: E402

pytestmark = pytest.mark.xdist_group("blip")

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32)
# (name, vision fields, text fields, image size to import at, layer layouts of
# the checkpoint and of the model it is loaded into). The second's image tokens
# are wider than the text (cross-attention's keys and values take 48), it is
# imported at another image size and its loss smooths the labels.
CASES = [
    ("blip", VISION, TEXT, None, (False, False)),
    ("blip-wide-48px-smoothed", dict(VISION, hidden_size=48, intermediate_size=96),
     dict(TEXT, label_smoothing=0.1), 48, (True, False)),
]


def bert_tokenizer(folder, words=()):
  """A BERT WordPiece tokenizer over the test captions' words (and `words`),
  with BLIP's [DEC] start token added after the vocabulary, as BLIP's own
  has it."""
  words = sorted({w for c in CAPTIONS for w in c.split()} | {"picture", "of", "an", "image"}
                 | set(words))
  folder.mkdir(parents=True, exist_ok=True)
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + ["##s", "##es"]
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
  tok = transformers.BertTokenizer(str(folder / "vocab.txt"))
  tok.add_special_tokens({"bos_token": "[DEC]"})
  tok.save_pretrained(folder)
  return transformers.AutoTokenizer.from_pretrained(folder)


def blip_model(tmp_path, vision, text, seed=0, sep_boost=0.0, words=()):
  """A random BlipForConditionalGeneration saved with its processor."""
  tok = bert_tokenizer(tmp_path / "tok", words)
  torch.manual_seed(seed)
  config = transformers.BlipConfig(
      vision_config=vision,
      text_config=dict(text, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id))
  model = transformers.BlipForConditionalGeneration(config).eval()
  with torch.no_grad():  # random norms, biases and embeddings, not ones, zeros and 1e-10
    for name, p in model.named_parameters():
      if "norm" in name or "Norm" in name or name.endswith("bias") or "embedding" in name:
        p.add_(torch.randn_like(p) * 0.1)
    # Raise [SEP]'s logit everywhere, so that decoding meets it at varied steps.
    model.text_decoder.cls.predictions.bias[tok.sep_token_id] += sep_boost
  folder = tmp_path / "hf"
  model.save_pretrained(folder)
  size = vision["image_size"]
  image = transformers.BlipImageProcessor(size={"height": size, "width": size})
  transformers.BlipProcessor(image_processor=image, tokenizer=tok).save_pretrained(folder)
  return model, tok, folder


def _kw(image_size):
  return {"interpolate_pos_encoding": True} if image_size else {}


@pytest.mark.parametrize("name, vision, text, image_size, scan", CASES,
                         ids=[c[0] for c in CASES])
def test_blip_matches_transformers(tmp_path, name, vision, text, image_size, scan):
  hf, tok, folder = blip_model(tmp_path, vision, text, seed=3, sep_boost=3.0)
  importer.import_hf(str(tmp_path / "run"), hf_dir=str(folder), image_size=image_size,
                     overrides=_scan(scan[0]))
  cfg, graphdef, params = _load(tmp_path / "run", _scan(scan[1]))
  d = cfg.model.decoder
  assert (d.model_type, d.bos_token_id, d.eos_token_id, d.pad_token_id) == (
      "blip_text_model", tok.bos_token_id, tok.sep_token_id, 0)
  assert cfg.train.label_smoothing == text.get("label_smoothing", 0.0)
  assert cfg.data.resize == "squash" and cfg.data.resample == "bicubic"
  assert tuple(cfg.model.image_mean) == pytest.approx((0.48145466, 0.4578275, 0.40821073))
  size = image_size or vision["image_size"]
  images, ids, pixels = _inputs(cfg, size, batch=4, length=9, seed=5)
  ids[:, 0] = d.bos_token_id
  model = nnx.merge(graphdef, params)

  # Teacher forcing: logits within 1e-4, the loss (smoothed as configured) within 1e-5.
  ours = np.asarray(model(jnp.asarray(images), jnp.asarray(ids)[:, None]))[:, 0]
  labels = ids.copy()
  labels[:, -3:] = -100  # padding, ignored by both
  with torch.no_grad():
    out = hf(pixel_values=pixels, input_ids=torch.from_numpy(ids).long(),
             labels=torch.from_numpy(labels).long(), **_kw(image_size))
  np.testing.assert_allclose(ours, out.logits.numpy(), atol=1e-4, rtol=0)
  shifted = np.roll(labels, -1, axis=1)
  shifted[:, -1] = -100
  batch = {"image": jnp.asarray(images), "input_ids": jnp.asarray(ids)[:, None],
           "labels": jnp.asarray(np.maximum(shifted, 0))[:, None],
           "loss_mask": jnp.asarray(shifted >= 0, jnp.float32)[:, None]}
  loss, _ = loss_fn(params, graphdef, batch, label_smoothing=cfg.train.label_smoothing)
  assert float(loss) == pytest.approx(out.loss.item(), rel=1e-5)

  # Captions: greedy and 4 beams, token for token, and the same after a prompt
  # (HF's output holds [DEC] and the prompt's tokens; ours the caption after them).
  prompt = tok("a picture of", add_special_tokens=False)["input_ids"]
  for start in ((d.bos_token_id,), (d.bos_token_id, *prompt)):
    given = torch.tensor([[tok.cls_token_id, *start[1:], tok.sep_token_id]] * len(images))
    for beams in (1, 4):
      if beams == 1:
        tokens = generate.greedy(model, jnp.asarray(images), 12, start, d.eos_token_id,
                                 d.pad_token_id)
      else:
        tokens = generate.beam_search(model, jnp.asarray(images), 12, beams, start,
                                      d.eos_token_id, d.pad_token_id, 1.0, False)
      with torch.no_grad():
        ref = hf.generate(pixel_values=pixels, input_ids=given, max_new_tokens=12,
                          num_beams=beams, do_sample=False, length_penalty=1.0,
                          early_stopping=False, **_kw(image_size))[:, len(start):].numpy()
      ref = np.pad(ref, ((0, 0), (0, 12 - ref.shape[1])), constant_values=d.pad_token_id)
      np.testing.assert_array_equal(np.asarray(tokens), ref,
                                    err_msg=f"{beams} beams, start {start}")


def test_blip_import_then_export_gives_every_weight_back(tmp_path):
  hf, tok, folder = blip_model(tmp_path, CASES[1][1], CASES[1][2], seed=1)
  importer.import_hf(str(tmp_path / "run"), hf_dir=str(folder), overrides=_scan(True))
  exporter.export_hf(str(tmp_path / "run"), str(tmp_path / "exported"))
  back = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path / "exported").eval()
  sd_a, sd_b = hf.state_dict(), back.state_dict()
  assert set(sd_a) == set(sd_b)
  for k in sd_a:
    torch.testing.assert_close(sd_a[k], sd_b[k], rtol=0, atol=0, msg=k)
  assert back.config.text_config.label_smoothing == 0.1
  assert back.config.text_config.sep_token_id == tok.sep_token_id
  processor = transformers.BlipProcessor.from_pretrained(tmp_path / "exported")
  assert processor.image_processor.size == {"height": 32, "width": 32}
  assert processor.tokenizer.bos_token_id == tok.bos_token_id


def test_a_prompt_is_trained_without_loss_on_its_tokens(tmp_path):
  """inputs [DEC] + prompt + caption, labels prompt + caption + [SEP]; the
  prompt's labels carry no loss, and truncation keeps the prompt whole."""
  from pipeline import transforms
  tok = bert_tokenizer(tmp_path / "tok")
  special = (tok.bos_token_id, tok.sep_token_id, tok.pad_token_id)
  prompt = transforms.prompt_tokens(tok, "a picture of")
  caption = tok("a red circle", add_special_tokens=False)["input_ids"]
  out = transforms.tokenize_captions(tok, ["a red circle", "a red circle"], 9, special, prompt)
  assert out["input_ids"][0].tolist() == [special[0], *prompt, *caption, 0, 0]
  assert out["labels"][0].tolist() == [*prompt, *caption, special[1], 0, 0]
  assert out["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0]
  short = transforms.tokenize_captions(tok, ["a red circle"], 5, special, prompt)
  assert short["loss_mask"][0].tolist() == [0, 0, 0, 1, 1]
  assert transforms.prompt_tokens(tok, "") == []


def _blip_captioner(dtype="float32", remat="none", scan=False, lora_rank=0):
  from trainer import config as config_lib
  from trainer.models.captioner import build_captioner
  cfg = config_lib.load("demo")
  cfg.model.encoder.update(model_type="blip_vision_model", hidden_size=48, num_hidden_layers=1,
                           num_attention_heads=4, intermediate_size=96, image_size=32,
                           patch_size=8)
  cfg.model.decoder = dict(model_type="blip_text_model", vocab_size=60, hidden_size=32,
                           encoder_hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=16)
  cfg.model.update(dtype=dtype, remat=remat, scan_layers=scan)
  cfg.model.lora.rank = lora_rank
  return build_captioner(cfg.model, seed=0)


def test_the_blip_decoder_takes_what_gpt2_takes():
  """Scanned and rematerialised layers give the listed layers' loss and
  gradients; LoRA's default targets put adapters on every projection of
  its layers; bfloat16 keeps float32 parameters and float32's loss."""
  import jax
  from trainer import optim
  from trainer.models import lora
  from trainer.params import to_layout
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
  ids = jnp.asarray(rng.integers(0, 60, (2, 3, 6)), jnp.int32)

  def loss_and_grads(model):
    graphdef, params = nnx.split(model)
    batch = {"image": images, "input_ids": ids, "labels": jnp.roll(ids, -1, axis=-1),
             "loss_mask": jnp.ones(ids.shape, jnp.float32)}
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, graphdef, batch)[0]))(params)

  plain = _blip_captioner()
  loss, grads = loss_and_grads(plain)
  scanned = _blip_captioner(remat="full", scan=True)
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, to_layout(nnx.to_pure_dict(nnx.state(plain, nnx.Param)), True))
  nnx.update(scanned, state)
  loss_s, grads_s = loss_and_grads(scanned)
  assert float(loss_s) == pytest.approx(float(loss), rel=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(grads)),
                  jax.tree.leaves(to_layout(nnx.to_pure_dict(grads_s), False))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  adapted = _blip_captioner("bfloat16", lora_rank=2)
  names = [optim.param_name(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(nnx.state(adapted, nnx.Param))[0]]
  expected = sorted(f"decoder/layers/{i}/{m}/{n}/lora_{ab}" for i in range(2) for ab in "ab"
                    for m, n in [(a, p) for a in ("attention", "crossattention")
                                 for p in ("query", "key", "value", "out")]
                    + [("mlp", "fc"), ("mlp", "proj")])
  assert sorted(n for n in names if lora.is_adapter(n) and n.startswith("decoder/")) == expected
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(adapted, nnx.Param)))
  nll = nnx.jit(lambda m: jnp.mean(jax.nn.log_softmax(m(images, ids).astype(jnp.float32))[..., 0]))
  assert float(nll(adapted)) == pytest.approx(float(nll(plain)), rel=0.02)
