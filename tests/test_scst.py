"""Self-critical sequence training: rewards and advantages against
pycocoevalcap's CIDEr-D, the step sharded as on one device given the same
samples, and through the real command: a SIGKILLed run resumed draws the
same samples and ends with the same losses, and two processes score their
own rows and train as one."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, TINY_CONFIG, run_and_kill, run_capjax, run_local
from trainer import scst
from trainer.metrics import caption_metrics


def _train_refs(synthetic_coco, n):
  with open(synthetic_coco / "annotations" / "captions_train.json") as f:
    data = json.load(f)
  by_image = {}
  for a in data["annotations"]:
    by_image.setdefault(a["image_id"], []).append(a["caption"])
  return [by_image[k] for k in sorted(by_image)][:n]


def test_rewards_and_advantages_equal_pycocoevalcap_with_the_training_frequencies(
    synthetic_coco):
  """CIDEr-D of a batch of captions, document frequencies from 40 training
  images' references: pycocoevalcap's CiderD over those 40 images (whose
  frequencies are those), each caption scored against its image's
  references; then the mean-of-the-others and greedy baselines."""
  from pycocoevalcap.cider.cider_scorer import CiderScorer
  refs = _train_refs(synthetic_coco, 40)
  rng = np.random.default_rng(0)
  # each image's caption: a reference of its own, one of another image, or a cut one
  hyps = [rs[0] if i % 3 == 0 else refs[(i + 7) % 40][1] if i % 3 == 1 else
          " ".join(rs[1].split()[:3]) for i, rs in enumerate(refs)]
  df = scst.DocumentFrequencies.build(refs)
  assert df.images == 40
  scorer = CiderScorer(n=4, sigma=6.0)
  toks = caption_metrics.tokenize([r for rs in refs for r in rs])
  at = np.cumsum([0] + [len(rs) for rs in refs])
  for i, h in enumerate(caption_metrics.tokenize(hyps)):
    scorer += (h, toks[at[i]:at[i + 1]])
  _, expected = scorer.compute_score()

  batch = rng.permutation(40)[:12]  # a batch of 12 of them, scored alone
  reward, cider = scst.score([hyps[i] for i in batch], [refs[i] for i in batch], df)
  np.testing.assert_allclose(cider, expected[batch], rtol=1e-12)
  assert (reward == cider).all() and expected.max() > 1.0 and expected.min() < 0.5
  # A sampled caption may hold any byte the BPE knows, line breaks (\x0b,
  # \u2028) and a tag's opening among them: scored alone, it moves no other
  # caption's tokens (one pass over the batch would shift the rest).
  odd = ["a small\x0bred cross\u2028on a <b c='x background"]
  _, shifted = scst.score(odd + [hyps[i] for i in batch], [refs[batch[0]]] + [
      refs[i] for i in batch], df)
  np.testing.assert_allclose(shifted[1:], expected[batch], rtol=1e-12)
  with_bleu, _ = scst.score([hyps[i] for i in batch], [refs[i] for i in batch], df, 0.5)
  bleu4 = [caption_metrics.bleu(caption_metrics.tokenize([hyps[i]]),
                                [caption_metrics.tokenize(refs[i])])[3] for i in batch]
  np.testing.assert_allclose(with_bleu, cider + 0.5 * np.array(bleu4), rtol=1e-12)

  sample = rng.random((3, 4))
  adv, base = scst.advantages(sample, None, "mean")
  for b in range(3):
    for k in range(4):
      others = [sample[b, j] for j in range(4) if j != k]
      assert base[b, k] == pytest.approx(sum(others) / 3, rel=1e-12)
      assert adv[b, k] == pytest.approx(sample[b, k] - sum(others) / 3, rel=1e-12)
  greedy = rng.random(3)
  adv, base = scst.advantages(sample, greedy, "greedy")
  np.testing.assert_allclose(adv, sample - greedy[:, None])
  assert scst.DocumentFrequencies.from_json(df.to_json()).counts == df.counts


SCST = ["--config.train.objective=scst", "--config.train.scst.samples=3",
        "--config.train.scst.max_length=10", "--config.data.captions_per_image=5",
        "--config.train.learning_rate=1e-3", "--config.train.schedule=constant",
        "--config.train.log_every=1", "--config.checkpoint.every_steps=2",
        "--config.data.worker_count=0"]


def _args(workdir, prepared, init, *extra):
  return ["train", "--config", TINY_CONFIG, "--workdir", str(workdir),
          f"--config.data.train={prepared['train']}", f"--config.data.eval={prepared['val']}",
          f"--config.train.init_from={init}", *SCST, *extra]


def _rows(workdir):
  """step -> (loss, reward), the last line of each step."""
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    r = json.loads(line)
    if "train/loss" in r:
      out[r["step"]] = (r["train/loss"], r["scst/reward"])
  return out


def _devices(n):
  return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def test_scst_resumes_exactly_and_two_processes_train_as_one(prepared, trained_run, tmp_path):
  """From the tiny cross-entropy run: 6 SCST steps on 8 devices; the same
  run SIGKILLed after its checkpoint at 2 and run again draws the same
  samples (the same rewards) and ends with the same losses, bit for bit;
  two processes of 4 devices, each scoring its own rows, draw and score
  what one process does."""
  one = tmp_path / "one"
  proc = run_capjax(*_args(one, prepared, trained_run, "--config.train.steps=6"),
                    env=_devices(8))
  assert "reward" in proc.stdout.splitlines()[-1]
  rows = _rows(one)
  assert sorted(rows) == list(range(1, 7))
  assert (one / scst.DF_FILE).is_file()
  saved = json.loads((one / "metrics.jsonl").read_text().splitlines()[0])
  for key in ("scst/baseline", "scst/advantage_std", "scst/sample_cider", "scst/greedy_cider",
              "scst/sample_length"):
    assert key in saved, key

  killed = tmp_path / "killed"
  # the save at 4 began: the one at 2 is complete
  run_and_kill(_args(killed, prepared, trained_run, "--config.train.steps=100000"), "step 5/",
               env=_devices(8))
  again = run_capjax(*_args(killed, prepared, trained_run, "--config.train.steps=6"),
                     env=_devices(8))
  assert "resuming from the checkpoint at step" in again.stdout
  assert _rows(killed) == rows

  # Two processes: each samples and scores its own rows; the rewards (summed
  # over the processes) and the first step's loss are the one process's. Later
  # steps may part: a sampled token flips on the last bit of a logit, and the
  # two runs' gradients are summed in another order.
  two = tmp_path / "two"
  proc = run_local(2, 4, *_args(two, prepared, trained_run, "--config.train.steps=1"))
  assert "[1] " in proc.stdout
  got = _rows(two)
  assert got[1][1] == pytest.approx(rows[1][1], rel=1e-6)  # gathered in float32
  assert got[1][0] == pytest.approx(rows[1][0], rel=1e-5)
  assert sorted(got) == [1]


SHARDED_STEP = r"""
import json, sys
import jax, numpy as np
from trainer import config as config_lib, scst, sharding, step as step_lib
cfg = config_lib.load(sys.argv[1], ["config.model.decoder.vocab_size=300",
                                    "config.train.objective=scst", "config.train.scst.top_k=3",
                                    "config.train.scst.temperature=0.8",
                                    "config.train.scst.xent_weight=0.5"])
cfg.model.decoder.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)
rng = np.random.default_rng(0)
samples = rng.integers(1, 300, (8, 5, 10))
samples[:, :, 6:] = 0  # ended
critic = scst.Critic.__new__(scst.Critic)
critic.start, critic.eos, critic.pad, critic.s = (0,), 0, 0, cfg.train.scst
local = critic.teacher_forced(samples)
local.pop("length")
local.update(image=rng.integers(0, 256, (8, 32, 32, 3)).astype(np.uint8),
             skipped=np.zeros(8, np.int32), advantage=rng.normal(size=(8, 5)).astype(np.float32))
refs = rng.integers(1, 300, (8, 3, 9))  # 3 references an image, shorter than the samples
ref_mask = (np.arange(8) < rng.integers(2, 9, (8, 3, 1))).astype(np.float32)
local = critic.with_references(local, {"input_ids": refs[..., :-1], "labels": refs[..., 1:],
                                       "loss_mask": ref_mask})
assert local["input_ids"].shape == (8, 8, 10) and local["loss_mask"][:, 5:, 8:].sum() == 0
assert (local["advantage"][:, 5:] == 0.5).all() and local["sampled"].sum() == 40
out = []
for n, axes in ((1, (1, 1, 1)), (8, (2, 2, 2))):
  cfg.mesh.update(data=axes[0], fsdp=axes[1], tensor=axes[2])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n])
  s = step_lib.setup(cfg, mesh)
  params, opt = s.init()
  batch = sharding.global_batch(local, mesh)
  params, opt, _, _, m = s.train_step(params, opt, jax.numpy.int32(0), jax.numpy.bool_(True),
                                      batch)
  out.append([float(m["train/loss"]), float(m["train/grad_norm"])]
             + [float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(params)])
print(json.dumps(out))
"""


def test_an_scst_step_sharded_equals_one_device_given_the_same_samples():
  """The SCST step (advantage-weighted log-probabilities of 5 samples an
  image behind one encoder pass, under the top-3 distribution at temperature
  0.8 they are drawn from, and 3 references' cross-entropy at weight 0.5)
  as data=2, fsdp=2, tensor=2 on 8 devices:
  the loss, gradient norm and updated parameters of one device, within 1e-5."""
  proc = subprocess.run([sys.executable, "-c", SHARDED_STEP, TINY_CONFIG], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, **_devices(8)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  one, sharded = json.loads(proc.stdout.splitlines()[-1])
  assert one[0] != 0.0 and one[1] > 0
  np.testing.assert_allclose(sharded, one, rtol=1e-5)
