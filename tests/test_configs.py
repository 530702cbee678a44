"""The COCO configs build their model and take a sharded train step on 8 CPU
devices, shrunk by overrides to seconds (and trained on the test data)."""

import json
import os

import pytest

from tests.conftest import REPO, run_capjax

SMALL = ["config.model.encoder.hidden_size=32", "config.model.encoder.num_hidden_layers=1",
         "config.model.encoder.num_attention_heads=2", "config.model.encoder.intermediate_size=64",
         "config.model.encoder.image_size=32", "config.model.encoder.patch_size=8",
         "config.model.decoder.n_embd=32", "config.model.decoder.n_layer=2",
         "config.model.decoder.n_head=2", "config.model.decoder.n_positions=32",
         "config.model.decoder.vocab_size=0", "config.data.image_size=32",
         "config.data.max_length=24", "config.tokenizer.vocab_size=300", "config.train.init_from=",
         "config.train.batch_size=8", "config.train.epochs=0", "config.train.steps=2",
         "config.train.warmup_steps=1", "config.data.worker_count=0", "config.eval.every_steps=0",
         "config.checkpoint.every_steps=2", "config.checkpoint.best_metric=",
         "config.eval.max_length=12", "config.train.log_every=1"]


@pytest.mark.parametrize("name, mesh", [("coco_vit_gpt2", "data 8 x fsdp 1 x tensor 1"),
                                        ("coco_siglip_gpt2", "data 8 x fsdp 1 x tensor 1"),
                                        ("coco_pod", "data 2 x fsdp 4 x tensor 1")])
def test_coco_config_trains_sharded(prepared, tmp_path, name, mesh):
  proc = run_capjax("train", "--config", os.path.join(REPO, "configs", f"{name}.py"),
                    "--workdir", str(tmp_path), f"--config.data.train={prepared['train']}",
                    f"--config.data.eval={prepared['val']}", *(f"--{o}" for o in SMALL),
                    env={"JAX_PLATFORMS": "cpu",
                         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert f"mesh {mesh} on 8 cpu devices" in proc.stdout
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == 2 and all(l == l and l > 0 for l in losses)
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["model"]["dtype"] == "bfloat16" and saved["data"]["captions_per_image"] == 5
  encoder = "siglip_vision_model" if "siglip" in name else "vit"
  assert saved["model"]["encoder"].get("model_type", "vit") == encoder
