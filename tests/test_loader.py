"""The training loader: deterministic, resumable to the batch."""

import numpy as np
import pytest

from pipeline import tokenizer
from tests.conftest import TINY_CONFIG
from trainer import config, train


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_iterator_yields_the_same_batches(prepared, tmp_path, workers):
  cfg = config.load(TINY_CONFIG, [f"config.data.train={prepared['train']}",
                                  f"config.data.worker_count={workers}",
                                  "config.data.crop_scale=0.5"])
  tok_dir = str(tmp_path / "tok")
  tok = tokenizer.train_bpe(["a red circle", "two blue squares"] * 20, 280, tok_dir)
  d = cfg.model.decoder
  d.bos_token_id, d.eos_token_id, d.pad_token_id = tokenizer.special_ids(tok)
  it = iter(train.make_loader(cfg, tok_dir))
  for _ in range(3):
    next(it)
  state = it.get_state()
  straight = [next(it) for _ in range(4)]
  again = iter(train.make_loader(cfg, tok_dir))
  again.set_state(state)
  restored = [next(again) for _ in range(4)]
  for a, b in zip(straight, restored):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert straight[0]["image"].shape == (cfg.train.batch_size, 32, 32, 3)
  assert not np.array_equal(straight[0]["image"], straight[1]["image"])
