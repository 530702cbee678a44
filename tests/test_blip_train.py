"""BLIP through the real commands: trained sharded as on one device, resumed
bit for bit after SIGKILL, and an imported BLIP fine-tuned, exported and
captioning in transformers as it does in capjax."""

import json
import os

import numpy as np
import pytest

from tests.conftest import REPO, run_and_kill, run_capjax

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.test_blip import TEXT, VISION, blip_model  # noqa: E402

# The demo with BLIP's vision tower and text decoder (image tokens wider than
# the text, dropout on), trained from scratch after a prompt.
BLIP_DEMO = """from ml_collections import ConfigDict
from configs import demo

def get_config():
  c = demo.get_config()
  c.model.encoder.update(model_type="blip_vision_model", layer_norm_eps=1e-5,
                         num_hidden_layers=2)
  c.model.decoder = ConfigDict(dict(
      model_type="blip_text_model", vocab_size=0, hidden_size=64, encoder_hidden_size=128,
      intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
  c.model.prompt = "a picture of"
  c.train.batch_size = 16
  c.train.schedule = "constant"
  c.train.log_every = 1
  return c
"""
STEPS = 9


def _devices(n):
  return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def _args(config, prepared, workdir, *extra):
  return ["train", "--config", str(config), "--workdir", str(workdir),
          f"--config.data.train={prepared['train']}", f"--config.data.eval={prepared['val']}",
          "--config.data.worker_count=0", "--config.checkpoint.every_steps=3", *extra]


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_blip_trains_sharded_as_on_one_device_and_resumes_exactly(prepared, tmp_path):
  config = tmp_path / "blip_demo.py"
  config.write_text(BLIP_DEMO)
  one = tmp_path / "one"
  run_capjax(*_args(config, prepared, one, f"--config.train.steps={STEPS}"), env=_devices(1))
  saved = json.loads((one / "config.json").read_text())
  assert saved["model"]["decoder"]["model_type"] == "blip_text_model"
  assert sorted(_losses(one)) == list(range(1, STEPS + 1))

  run_capjax(*_args(config, prepared, tmp_path / "sharded", f"--config.train.steps={STEPS}",
                    "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"),
             env=_devices(8))
  sharded = _losses(tmp_path / "sharded")
  np.testing.assert_allclose([sharded[s] for s in sorted(sharded)],
                             [_losses(one)[s] for s in sorted(sharded)], rtol=1e-5)

  killed = tmp_path / "killed"
  # the save at 6 began: the one at 3 is complete
  run_and_kill(_args(config, prepared, killed, "--config.train.steps=100000"), "step 7/",
               env=_devices(1))
  again = run_capjax(*_args(config, prepared, killed, f"--config.train.steps={STEPS}"),
                     env=_devices(1))
  assert "resuming from the checkpoint at step" in again.stdout
  assert _losses(killed) == _losses(one)


def test_an_imported_blip_fine_tuned_captions_the_same_in_transformers(
    prepared, synthetic_coco, tmp_path):
  """Imported, trained 200 steps after the prompt (label smoothing on),
  exported: transformers' BlipForConditionalGeneration, given the same
  pixels and the prompt, writes capjax's captions token for token."""
  from trainer.inference import TrainedCaptioner

  with open(synthetic_coco / "annotations" / "captions_train.json") as f:
    words = {w for a in json.load(f)["annotations"] for w in a["caption"].lower().split()}
  hf, tok, folder = blip_model(tmp_path, VISION, dict(TEXT, label_smoothing=0.1), seed=2,
                               words=words)
  run_capjax("import-hf", str(folder), "--out", str(tmp_path / "imported"))
  run_capjax("train", "--config", os.path.join(REPO, "configs", "coco_blip.py"),
             "--workdir", str(tmp_path / "ft"), f"--config.train.init_from={tmp_path / 'imported'}",
             f"--config.data.train={prepared['train']}", f"--config.data.eval={prepared['val']}",
             "--prompt", "a picture of", "--config.model.dtype=float32",
             "--config.data.worker_count=0", "--config.data.captions_per_image=3",
             "--config.data.max_length=24", "--config.train.epochs=0",
             "--config.train.steps=200", "--config.train.batch_size=16",
             "--config.train.learning_rate=2e-3", "--config.train.warmup_steps=10",
             "--config.train.log_every=50", "--config.checkpoint.every_steps=200",
             "--config.checkpoint.best_metric=", "--config.eval.every_steps=0",
             "--config.eval.batch_size=8", "--config.mesh.data=1")
  losses = _losses(tmp_path / "ft")
  assert losses[200] < 0.5 * losses[1]
  run_capjax("export-hf", str(tmp_path / "ft"), "--out", str(tmp_path / "exported"))

  model = TrainedCaptioner(str(tmp_path / "ft"))
  assert model.start[0] == tok.bos_token_id and len(model.start) == 4  # [DEC] a picture of
  files = sorted((synthetic_coco / "val").iterdir())[:8]
  pixels_u8 = np.stack(model.decode([p.read_bytes() for p in files]))
  captions, ids = next(model.caption_batches([[(p.name, p.read_bytes()) for p in files]]))
  assert len(set(captions)) > 1 and all(c and "picture" not in c for c in captions)

  back = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path / "exported").eval()
  processor = transformers.BlipProcessor.from_pretrained(tmp_path / "exported")
  mean, std = np.array(model.cfg.model.image_mean), np.array(model.cfg.model.image_std)
  pixels = ((pixels_u8 / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
  prompt = processor(text=["a picture of"] * len(files), return_tensors="pt")["input_ids"]
  with torch.no_grad():
    out = back.generate(pixel_values=torch.from_numpy(pixels), input_ids=prompt,
                        max_new_tokens=model.cfg.eval.max_length, num_beams=3,
                        do_sample=False, length_penalty=1.0, early_stopping=False)
  theirs = [processor.decode(row[4:], skip_special_tokens=True).strip() for row in out]
  assert theirs == captions
  sep = tok.sep_token_id  # token for token up to [SEP] (what follows is padding either way)
  cut = lambda row: list(row[:list(row).index(sep) + 1]) if sep in list(row) else list(row)
  assert [cut(r) for r in out[:, 4:].tolist()] == [cut(r) for r in ids.tolist()]
