import pytest

from trainer import config


def test_overrides_keep_types():
  cfg = config.load("demo", ["config.train.batch_size=64", "config.train.learning_rate=1e-3",
                             "config.eval.content_accuracy=false", "config.data.train=/x",
                             "config.model.image_mean=(0.1, 0.2, 0.3)"])
  assert cfg.train.batch_size == 64 and isinstance(cfg.train.batch_size, int)
  assert cfg.train.learning_rate == 1e-3
  assert cfg.eval.content_accuracy is False
  assert cfg.data.train == "/x"
  assert tuple(cfg.model.image_mean) == (0.1, 0.2, 0.3)


@pytest.mark.parametrize("override, message", [
    ("config.train.nope=1", "unknown config key"),
    ("config.nope.steps=1", "has no 'nope'"),
    ("config.train.steps=many", "config.train.steps=many"),
    ("config.train.steps", "expected --config.KEY=VALUE"),
])
def test_bad_overrides_name_the_flag(override, message):
  with pytest.raises(ValueError, match=message):
    config.load("demo", [override])


def test_missing_config_file():
  with pytest.raises(FileNotFoundError, match="no_such_config"):
    config.load("no_such_config")
