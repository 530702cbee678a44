"""LoRA: fresh adapters change nothing, only adapters train, and the merged
export computes what the adapted model computes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests.conftest import TINY_CONFIG, run_capjax
from trainer import config as config_lib, optim, params as params_lib, sharding, step as step_lib
from trainer.models import lora
from trainer.models.captioner import build_captioner

# One worker runs the module: its module-scoped runs are made once.
pytestmark = pytest.mark.xdist_group("lora")

TRAIN = ("--config.train.schedule=constant", "--config.train.learning_rate=1e-2",
         "--config.train.warmup_steps=1", "--config.train.steps=6",
         "--config.checkpoint.every_steps=3")


def _tiny(**lora_fields):
  cfg = config_lib.load(TINY_CONFIG)
  cfg.model.decoder.vocab_size = 50
  cfg.model.encoder.hidden_size = 48  # unlike the decoder's 32: enc_to_dec_proj exists
  cfg.model.lora.update(lora_fields)
  return cfg


def _batch(cfg, n=3, g=2, length=7, seed=0):
  rng = np.random.default_rng(seed)
  size = cfg.model.encoder.image_size
  return (jnp.asarray(rng.integers(0, 256, (n, size, size, 3)), jnp.uint8),
          jnp.asarray(rng.integers(0, cfg.model.decoder.vocab_size, (n, g, length)), jnp.int32))


def _names(tree):
  return [optim.param_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize("scan", [False, True])
def test_fresh_adapters_leave_the_outputs_unchanged(scan):
  """Exactly the base model's logits, in evaluation and with dropout on."""
  base_cfg = _tiny()
  cfg = _tiny(rank=4, alpha=8.0, dropout=0.2)
  for c in (base_cfg, cfg):
    c.model.scan_layers = scan
    c.model.decoder.update(resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1)
  base, model = build_captioner(base_cfg.model), build_captioner(cfg.model)
  names = _names(nnx.state(model))
  adapters = [n for n in names if lora.is_adapter(n)]
  # Every linear layer of both stacks, the projection included: 6 a ViT
  # layer, 10 a GPT-2 layer, an A and a B each.
  assert len(adapters) == 2 * (6 + 10 + 1), adapters
  assert "enc_to_dec_proj/lora_a" in adapters
  images, ids = _batch(cfg)
  for key in (None, jax.random.key(3)):
    np.testing.assert_array_equal(model(images, ids, key), base(images, ids, key))
  # Non-zero adapters do change them.
  graphdef, state = nnx.split(model)
  state = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if optim.param_name(p).endswith("lora_b") else x, state)
  changed = nnx.merge(graphdef, state)(images, ids)
  assert np.abs(np.asarray(changed - base(images, ids))).max() > 1e-3


def test_targets_pick_layers_by_name():
  model = build_captioner(_tiny(rank=2, targets=r"^decoder/.*crossattention/(query|value)$").model)
  adapters = sorted(n for n in _names(nnx.state(model)) if lora.is_adapter(n))
  assert adapters == ["decoder/h/0/crossattention/query/lora_a",
                      "decoder/h/0/crossattention/query/lora_b",
                      "decoder/h/0/crossattention/value/lora_a",
                      "decoder/h/0/crossattention/value/lora_b"]
  with pytest.raises(ValueError, match=r"model.lora.targets='nothing' matches no linear layer"):
    build_captioner(_tiny(rank=2, targets="nothing").model)


def test_only_trained_parameters_hold_optimiser_state():
  mesh = sharding.make_mesh(_tiny().mesh, jax.devices()[:1])
  cfg = _tiny(rank=4)
  setup = step_lib.setup(cfg, mesh)
  moments = [n for n in _names(setup.abs_opt) if "/mu/" in n]
  assert moments and all(lora.is_adapter(n) for n in moments)
  cfg.train.trainable = "/ln_f/"  # chosen base parameters train too
  moments = [n for n in _names(step_lib.setup(cfg, mesh).abs_opt) if "/mu/" in n]
  assert "1/0/mu/decoder/ln_f/scale" in moments
  cfg.train.freeze = "^encoder/"
  moments = [n for n in _names(step_lib.setup(cfg, mesh).abs_opt) if "/mu/" in n]
  assert moments and not any("encoder/" in n for n in moments)
  for flag, value, message in (("trainable", "^nothing", "matches no parameter"),
                               ("freeze", ".", "no parameter left to train")):
    bad = _tiny(rank=4)
    bad.train[flag] = value
    with pytest.raises(ValueError, match=message):
      step_lib.setup(bad, mesh)


@pytest.fixture(scope="module")
def runs(prepared, trained_run, tmp_path_factory):
  """A base run (the session's trained run), then LoRA fine-tuning from it
  (dropout on the adapters; scanned layers, where the base has one set of
  weights a layer)."""
  root = tmp_path_factory.mktemp("lora")
  (root / "base").symlink_to(trained_run)
  data = (f"--config.data.train={prepared['train']}", f"--config.data.eval={prepared['val']}")
  proc = run_capjax("train", "--config", TINY_CONFIG, "--workdir", str(root / "lora"), *data,
                    *TRAIN, f"--config.train.init_from={root / 'base'}",
                    "--config.model.lora.rank=4", "--config.model.lora.dropout=0.1",
                    "--config.model.scan_layers=true")
  assert "starting from the parameters of" in proc.stdout
  return root


def _restore(run, step=None, overrides=()):
  """A run's model, one set of weights a layer."""
  path = run if step is None else run / "checkpoints" / str(step)
  r = params_lib.restore(str(path), ["config.model.scan_layers=false", *overrides])
  return r, dict(zip(_names(r.params), jax.tree.leaves(r.params)))


def test_only_adapters_change_in_training(runs):
  _, base = _restore(runs / "base")
  r3, at3 = _restore(runs / "lora", 3)
  _, at6 = _restore(runs / "lora", 6)
  assert set(at6) == set(base) | {n for n in at6 if lora.is_adapter(n)}
  for name, value in at6.items():
    if lora.is_adapter(name):
      assert not np.array_equal(value, at3[name]), name
    else:  # the base model, exactly as the base run left it
      np.testing.assert_array_equal(value, base[name], err_msg=name)
      np.testing.assert_array_equal(value, at3[name], err_msg=name)


def test_merged_export_equals_the_adapted_model(runs, tmp_path):
  r, _ = _restore(runs / "lora")
  size = r.cfg.model.encoder.image_size
  images, ids = _batch(r.cfg, n=4, g=1, length=9, seed=1)
  ours = np.asarray(nnx.merge(r.graphdef, r.params)(images, ids))[:, 0]
  b, _ = _restore(runs / "base")
  base = np.asarray(nnx.merge(b.graphdef, b.params)(images, ids))[:, 0]
  assert np.abs(ours - base).max() > 1e-2  # the adapters learnt something

  # A LoRA checkpoint loaded as a plain model: the adapters merged in.
  plain, names = _restore(runs / "lora", overrides=["config.model.lora.rank=0"])
  assert not any(lora.is_adapter(n) for n in names)
  merged = np.asarray(nnx.merge(plain.graphdef, plain.params)(images, ids))[:, 0]
  np.testing.assert_allclose(merged, ours, rtol=0, atol=1e-5)

  mean, std = np.array(r.cfg.model.image_mean), np.array(r.cfg.model.image_std)
  pixels = ((np.asarray(images) / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
  assert pixels.shape[-1] == size

  def logits(model):
    with torch.no_grad():
      return model(pixel_values=torch.from_numpy(pixels),
                   decoder_input_ids=torch.from_numpy(np.array(ids[:, 0])).long()).logits.numpy()

  run_capjax("export-hf", str(runs / "lora"), "--out", str(tmp_path / "hf"))
  merged = transformers.VisionEncoderDecoderModel.from_pretrained(tmp_path / "hf").eval()
  np.testing.assert_allclose(logits(merged), ours, rtol=0, atol=1e-5)

  # peft's format: the base weights, and the adapters loaded onto them by peft
  # (GPT-2's fused c_attn holding the query, key and value adapters).
  import peft
  run_capjax("export-hf", str(runs / "lora"), "--out", str(tmp_path / "peft"), "--peft")
  model = transformers.VisionEncoderDecoderModel.from_pretrained(tmp_path / "peft").eval()
  np.testing.assert_allclose(logits(model), base, rtol=0, atol=1e-5)
  adapted = peft.PeftModel.from_pretrained(model, tmp_path / "peft" / "adapter").eval()
  np.testing.assert_allclose(logits(adapted), ours, rtol=0, atol=1e-5)
  proc = run_capjax("export-hf", str(runs / "base"), "--out", str(tmp_path / "x"), "--peft",
                    check=False)
  assert proc.returncode == 1 and "has no LoRA adapters" in proc.stderr
  assert not (tmp_path / "x").exists()


def test_sharded_lora_training_matches_one_device(prepared, tmp_path):
  """data=2 fsdp=2 tensor=2 on 8 devices: the losses of one device."""
  losses = []
  for n, mesh in ((1, ()), (8, ("--config.mesh.data=2", "--config.mesh.fsdp=2",
                                "--config.mesh.tensor=2"))):
    workdir = tmp_path / str(n)
    run_capjax("train", "--config", TINY_CONFIG, "--workdir", str(workdir),
               f"--config.data.train={prepared['train']}",
               f"--config.data.eval={prepared['val']}", *TRAIN, *mesh,
               "--config.model.lora.rank=4", "--config.train.trainable=/ln_f/",
               env={"JAX_PLATFORMS": "cpu",
                    "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"})
    rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    losses.append([r["train/loss"] for r in rows if "train/loss" in r])
  assert len(losses[0]) == 6
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
