"""capjax's model against Hugging Face's PyTorch implementation: import,
export and the function they compute, on tiny random models built here."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pipeline import tokenizer as tokenizer_lib  # noqa: E402
from tests.conftest import TINY_CONFIG, run_capjax  # noqa: E402
from trainer import generate, params as params_lib  # noqa: E402
from trainer.hf import importer  # noqa: E402
from trainer.step import loss_fn  # noqa: E402

CAPTIONS = ["a red circle", "two blue squares on a plain background", "a small green cross"] * 30

# (name, encoder fields, decoder fields, image size to import at, the layer
# layouts: of the imported checkpoint, then of the model it is loaded into)
CASES = [
    ("same-width", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, image_size=32, patch_size=8),
     dict(n_embd=32, n_layer=2, n_head=4), None, (False, False)),
    ("projection", dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, image_size=32, patch_size=8, hidden_act="gelu_new",
                        layer_norm_eps=1e-6),
     dict(n_embd=32, n_layer=3, n_head=2, n_inner=80, activation_function="gelu",
          layer_norm_epsilon=1e-6), None, (True, True)),
    ("new-image-size", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, image_size=32, patch_size=8),
     dict(n_embd=48, n_layer=2, n_head=4), 48, (False, True)),
]


def _scan(on):
  return [f"config.model.scan_layers={str(on).lower()}"]


def _hf_model(tmp_path, enc, dec, seed=0, eos_boost=0.0, enc_cls=None):
  tok = tokenizer_lib.train_bpe(CAPTIONS, 280, str(tmp_path / "tok"))
  bos, eos, pad = tokenizer_lib.special_ids(tok)
  torch.manual_seed(seed)
  config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
      (enc_cls or transformers.ViTConfig)(**enc),
      transformers.GPT2Config(vocab_size=len(tok), n_positions=32, bos_token_id=bos,
                              eos_token_id=eos, add_cross_attention=True, is_decoder=True, **dec))
  config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = bos, pad, eos
  model = transformers.VisionEncoderDecoderModel(config).eval()
  with torch.no_grad():  # random LayerNorm and bias values too, not just ones and zeros
    for name, p in model.named_parameters():
      if "ln" in name or "norm" in name or "layer_scale" in name or name.endswith("bias"):
        p.add_(torch.randn_like(p) * 0.1)
    # Raise EOS's logit everywhere, so that decoding meets it at varied steps.
    e = model.decoder.transformer.wte.weight[eos]
    model.decoder.transformer.ln_f.bias.add_(eos_boost * e / e.dot(e))
  folder = tmp_path / "hf"
  model.save_pretrained(folder)
  tok.save_pretrained(folder)
  transformers.ViTImageProcessor(size={"height": enc["image_size"], "width": enc["image_size"]},
                                 image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]
                                 ).save_pretrained(folder)
  return model, folder


def _imported(tmp_path, folder, image_size, scan):
  """The HF folder imported (layers stacked or not), loaded in the other layout."""
  importer.import_hf(str(tmp_path / "run"), hf_dir=str(folder), image_size=image_size,
                     overrides=_scan(scan[0]))
  return _load(tmp_path / "run", _scan(scan[1]))


def assert_logits_and_loss_match(hf, graphdef, params, images, ids, pixels, **encoder_kwargs):
  """Teacher-forced logits within 1e-4 and the loss within 1e-5 relative
  (the last three positions padding, ignored by both)."""
  model = nnx.merge(graphdef, params)
  ours = np.asarray(model(jnp.asarray(images), jnp.asarray(ids)[:, None]))[:, 0]
  labels = np.roll(ids, -1, axis=1)
  labels[:, -3:] = -100
  with torch.no_grad():
    out = hf(pixel_values=pixels, decoder_input_ids=torch.from_numpy(ids).long(),
             labels=torch.from_numpy(labels).long(), **encoder_kwargs)
  np.testing.assert_allclose(ours, out.logits.numpy(), atol=1e-4, rtol=0)
  batch = {"image": jnp.asarray(images), "input_ids": jnp.asarray(ids)[:, None],
           "labels": jnp.asarray(np.maximum(labels, 0))[:, None],
           "loss_mask": jnp.asarray(labels >= 0, jnp.float32)[:, None]}
  loss, _ = loss_fn(params, graphdef, batch)
  assert float(loss) == pytest.approx(out.loss.item(), rel=1e-5)


def _load(run_dir, overrides=()):
  r = params_lib.restore(str(run_dir), overrides)
  return r.cfg, r.graphdef, r.params


def _inputs(cfg, size, batch=3, length=9, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, size, size, 3)).astype(np.uint8)
  ids = rng.integers(0, cfg.model.decoder.vocab_size, (batch, length)).astype(np.int32)
  mean, std = np.array(cfg.model.image_mean), np.array(cfg.model.image_std)
  pixels = ((images / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
  return images, ids, torch.from_numpy(pixels)


@pytest.mark.parametrize("name, enc, dec, image_size, scan", CASES, ids=[c[0] for c in CASES])
def test_logits_loss_and_greedy_match_transformers(tmp_path, name, enc, dec, image_size, scan):
  hf, folder = _hf_model(tmp_path, enc, dec)
  cfg, graphdef, params = _imported(tmp_path, folder, image_size, scan)
  assert cfg.model.scan_layers == scan[1]
  size = image_size or enc["image_size"]
  assert cfg.data.image_size == size and cfg.data.resize == "squash"
  assert tuple(cfg.model.image_mean) == pytest.approx((0.4, 0.5, 0.6))
  images, ids, pixels = _inputs(cfg, size)
  model = nnx.merge(graphdef, params)
  assert_logits_and_loss_match(hf, graphdef, params, images, ids, pixels,
                               interpolate_pos_encoding=image_size is not None)

  bos, eos, pad = (cfg.model.decoder.bos_token_id, cfg.model.decoder.eos_token_id,
                   cfg.model.decoder.pad_token_id)
  tokens = np.asarray(generate.greedy(model, jnp.asarray(images), 12, bos, eos, pad))
  with torch.no_grad():
    ref = hf.generate(pixel_values=pixels, max_new_tokens=12, num_beams=1, do_sample=False,
                      interpolate_pos_encoding=image_size is not None)[:, 1:].numpy()
  ref = np.pad(ref, ((0, 0), (0, 12 - ref.shape[1])), constant_values=pad)
  np.testing.assert_array_equal(tokens, ref)


@pytest.mark.parametrize("name, enc, dec, image_size, scan", CASES, ids=[c[0] for c in CASES])
def test_beam_search_matches_transformers(tmp_path, name, enc, dec, image_size, scan):
  hf, folder = _hf_model(tmp_path, enc, dec, seed=4, eos_boost=4.0)
  cfg, graphdef, params = _imported(tmp_path, folder, image_size, scan)
  model = nnx.merge(graphdef, params)
  images, _, pixels = _inputs(cfg, image_size or enc["image_size"], batch=6, seed=5)
  d = cfg.model.decoder
  ends = set()
  for length_penalty, early_stopping in [(1.0, False), (2.0, True), (0.5, "never"), (-1.0, False)]:
    ours = np.asarray(generate.beam_search(
        model, jnp.asarray(images), 12, 4, d.bos_token_id, d.eos_token_id, d.pad_token_id,
        length_penalty, early_stopping))
    with torch.no_grad():
      ref = hf.generate(pixel_values=pixels, max_new_tokens=12, num_beams=4, do_sample=False,
                        length_penalty=length_penalty, early_stopping=early_stopping,
                        interpolate_pos_encoding=image_size is not None)[:, 1:].numpy()
    ref = np.pad(ref, ((0, 0), (0, 12 - ref.shape[1])), constant_values=d.pad_token_id)
    np.testing.assert_array_equal(ours, ref, err_msg=f"{length_penalty} {early_stopping}")
    for row in ours.tolist():
      if d.eos_token_id in row:
        ends.add(row.index(d.eos_token_id))
  assert len(ends) >= 2  # EOS met, at different steps


def test_round_trips(tmp_path):
  _, enc, dec, _, _ = CASES[1]
  hf, folder = _hf_model(tmp_path, enc, dec, seed=1)
  # Stacked layers in the checkpoint; export writes one tensor a layer.
  run_capjax("import-hf", str(folder), "--out", str(tmp_path / "run"),
             "--config.model.scan_layers=true")
  run_capjax("export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "exported"))
  for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "generation_config.json"):
    assert (tmp_path / "exported" / f).is_file(), f
  back = transformers.VisionEncoderDecoderModel.from_pretrained(tmp_path / "exported").eval()
  sd_a, sd_b = hf.state_dict(), back.state_dict()
  for k in sd_a:  # import then export: the same weights (the unused ViT pooler aside)
    if "pooler" in k:
      continue
    torch.testing.assert_close(sd_a[k], sd_b[k], rtol=0, atol=0, msg=k)

  cfg, graphdef, params = _load(tmp_path / "run")
  images, ids, pixels = _inputs(cfg, enc["image_size"], seed=2)
  with torch.no_grad():
    a = hf(pixel_values=pixels, decoder_input_ids=torch.from_numpy(ids).long()).logits
    b = back(pixel_values=pixels, decoder_input_ids=torch.from_numpy(ids).long()).logits
  torch.testing.assert_close(a, b, rtol=0, atol=0)

  # export then import: identical parameters
  run_capjax("import-hf", str(tmp_path / "exported"), "--out", str(tmp_path / "again"))
  _, _, params2 = _load(tmp_path / "again", _scan(True))
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # Pushing: no token, nothing done; a failed upload (no Hub here) is one line,
  # keeps the folder, and the token shows up nowhere.
  env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
  proc = run_capjax("export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "pushed"),
                    "--push-to-hub", "someone/captioner", check=False, env={}, clean_env=env)
  assert proc.returncode != 0 and "HF_TOKEN" in proc.stderr
  assert not (tmp_path / "pushed").exists()
  secret = "hf_secret_value_123"
  proc = run_capjax("export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "pushed"),
                    "--push-to-hub", "someone/captioner", check=False,
                    env={"HF_TOKEN": secret, "HF_ENDPOINT": "http://127.0.0.1:9",
                         "HF_HUB_DISABLE_TELEMETRY": "1"})
  assert proc.returncode != 0 and "upload failed" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert secret not in proc.stdout + proc.stderr
  assert (tmp_path / "pushed" / "model.safetensors").is_file()
  for root, _, files in os.walk(tmp_path / "pushed"):
    for f in files:
      assert secret.encode() not in open(os.path.join(root, f), "rb").read(), f

  # The exported model decodes as the capjax one does.
  model = nnx.merge(graphdef, params)
  ours = np.asarray(generate.greedy(model, jnp.asarray(images), 8, back.config.decoder_start_token_id,
                                    back.config.eos_token_id, back.config.pad_token_id))
  with torch.no_grad():
    ref = back.generate(pixel_values=pixels, max_new_tokens=8, num_beams=1,
                        do_sample=False)[:, 1:].numpy()
  ref = np.pad(ref, ((0, 0), (0, 8 - ref.shape[1])), constant_values=back.config.pad_token_id)
  np.testing.assert_array_equal(ours, ref)


def test_encoder_and_decoder_separately(tmp_path):
  """The classic recipe: a ViT and a GPT-2, cross-attention new; the GPT-2 as
  a PyTorch `.bin`, read with PyTorch's weights-only loader."""
  _, enc, dec, _, _ = CASES[1]
  hf, folder = _hf_model(tmp_path, enc, dec, seed=3)
  hf.encoder.save_pretrained(tmp_path / "vit")
  transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
  hf.decoder.save_pretrained(tmp_path / "gpt2")
  os.remove(tmp_path / "gpt2" / "model.safetensors")
  torch.save(hf.decoder.state_dict(), tmp_path / "gpt2" / "pytorch_model.bin")
  tokenizer_lib.load(str(folder)).save_pretrained(tmp_path / "gpt2")
  run_capjax("import-hf", "--encoder", str(tmp_path / "vit"), "--decoder", str(tmp_path / "gpt2"),
             "--out", str(tmp_path / "run"))
  cfg, graphdef, params = _load(tmp_path / "run")
  from safetensors.numpy import load_file
  vit = load_file(tmp_path / "vit" / "model.safetensors")  # the names on disk
  gpt2 = {k: v.numpy() for k, v in hf.decoder.state_dict().items()}
  pure = nnx.to_pure_dict(params)
  np.testing.assert_array_equal(np.asarray(pure["decoder"]["wte"]["embedding"]),
                                gpt2["transformer.wte.weight"])
  np.testing.assert_array_equal(
      np.asarray(pure["encoder"]["layers"][0]["attention"]["query"]["kernel"]),
      vit["encoder.layer.0.attention.attention.query.weight"].T)
  assert "enc_to_dec_proj" in pure  # 48 -> 32, newly initialised


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused(tmp_path):
  """A `.bin` that would run code when unpickled is refused, and runs nothing."""
  _, enc, dec, _, _ = CASES[0]
  _, folder = _hf_model(tmp_path, enc, dec)
  os.remove(folder / "model.safetensors")
  torch.save({"x": _Payload(tmp_path / "pwned")}, folder / "pytorch_model.bin")
  proc = run_capjax("import-hf", str(folder), "--out", str(tmp_path / "x"), check=False)
  assert proc.returncode != 0 and "pytorch_model.bin: refused" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "pwned").exists() and not (tmp_path / "x").exists()


def test_bad_folder_is_one_line(tmp_path):
  proc = run_capjax("import-hf", str(tmp_path), "--out", str(tmp_path / "x"), check=False)
  assert proc.returncode != 0 and "no config.json" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "x").exists()


def test_training_starts_from_an_imported_model(tmp_path, prepared):
  """`train.init_from`: the imported model, tokenizer and image settings, in
  the other layer layout; with a zero learning rate the weights stay put.
  Its encoder is a DINOv2 with registers, the family furthest from ViT."""
  _, enc, dec, _, _ = CASES[0]
  enc = dict(enc, mlp_ratio=2, layerscale_value=0.5, num_register_tokens=2)
  _, folder = _hf_model(tmp_path, enc, dec, seed=6,
                        enc_cls=transformers.Dinov2WithRegistersConfig)
  run_capjax("import-hf", str(folder), "--out", str(tmp_path / "imported"))
  proc = run_capjax("train", "--config", TINY_CONFIG, "--workdir", str(tmp_path / "ft"),
                    f"--config.train.init_from={tmp_path / 'imported'}",
                    f"--config.data.train={prepared['train']}",
                    f"--config.data.eval={prepared['val']}",
                    "--config.model.scan_layers=true", "--config.train.learning_rate=0.0",
                    "--config.train.steps=2")
  assert "starting from the parameters of" in proc.stdout
  cfg, _, trained = _load(tmp_path / "ft", _scan(False))
  _, _, imported = _load(tmp_path / "imported")
  assert cfg.model.scan_layers is False and cfg.data.image_size == 32
  assert cfg.model.encoder.model_type == "dinov2_with_registers"
  assert cfg.model.decoder.n_embd == dec["n_embd"] and cfg.model.decoder.resid_pdrop == 0.1
  for x, y in zip(jax.tree.leaves(imported), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert len(tokenizer_lib.load(str(tmp_path / "ft" / "tokenizer"))) == \
      len(tokenizer_lib.load(str(folder)))


def test_no_repeat_ngram_size_matches_transformers(tmp_path):
  _, enc, dec, _, _ = CASES[0]
  hf, folder = _hf_model(tmp_path, enc, dec, seed=7)
  importer.import_hf(str(tmp_path / "run"), hf_dir=str(folder))
  cfg, graphdef, params = _load(tmp_path / "run")
  model = nnx.merge(graphdef, params)
  images, _, pixels = _inputs(cfg, enc["image_size"], batch=4, seed=8)
  d = cfg.model.decoder
  special = (d.bos_token_id, d.eos_token_id, d.pad_token_id)

  def repeats(rows, n):  # repeated n-grams before EOS
    rows = [r[:r.index(d.eos_token_id)] if d.eos_token_id in r else r for r in rows.tolist()]
    return sum(len(r) - n + 1 - len({tuple(r[i:i + n]) for i in range(len(r) - n + 1)})
               for r in rows if len(r) >= n)

  plain = np.asarray(generate.greedy(model, jnp.asarray(images), 14, *special))
  assert repeats(plain, 2) > 0  # random weights repeat themselves: the ban has work to do
  for beams, n in ((1, 2), (1, 3), (3, 2)):
    if beams == 1:
      ours = generate.greedy(model, jnp.asarray(images), 14, *special, no_repeat_ngram_size=n)
    else:
      ours = generate.beam_search(model, jnp.asarray(images), 14, beams, *special,
                                  no_repeat_ngram_size=n)
    ours = np.asarray(ours)
    with torch.no_grad():
      ref = hf.generate(pixel_values=pixels, max_new_tokens=14, num_beams=beams,
                        do_sample=False, no_repeat_ngram_size=n)[:, 1:].numpy()
    ref = np.pad(ref, ((0, 0), (0, 14 - ref.shape[1])), constant_values=d.pad_token_id)
    np.testing.assert_array_equal(ours, ref, err_msg=f"beams {beams}, n {n}")
    assert repeats(ours, n) == 0
