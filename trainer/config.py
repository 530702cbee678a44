"""Configs are Python files with a `get_config()` returning a ConfigDict,
overridden from the command line as `--config.train.batch_size=64`.
"""

from __future__ import annotations

import ast
import importlib.util
import os

from ml_collections import ConfigDict

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_path(path: str) -> str:
  """A config file path, or a config name from `configs/` (e.g. `demo`)."""
  if os.path.isfile(path):
    return path
  named = os.path.join(CONFIG_DIR, path if path.endswith(".py") else path + ".py")
  if os.path.isfile(named):
    return named
  raise FileNotFoundError(f"--config {path}: no such file, nor a config in {CONFIG_DIR}")


def load_file(path: str) -> ConfigDict:
  path = resolve_path(path)
  spec = importlib.util.spec_from_file_location("capjax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config {path}: defines no get_config()")
  return module.get_config()


def _parse_value(text: str, current):
  """Parses `text` to the type of the value it replaces."""
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"expected true or false, got {text!r}")
  if isinstance(current, str):
    return text
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise
  if isinstance(current, (list, tuple)):
    return type(current)(value if isinstance(value, (list, tuple)) else (value,))
  return value


def apply_overrides(cfg: ConfigDict, overrides: list[str]) -> ConfigDict:
  """Applies `config.a.b=value` strings (the leading `--` already removed)."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or not key.startswith("config."):
      raise ValueError(f"--{item}: expected --config.KEY=VALUE")
    path = key[len("config."):].split(".")
    node = cfg
    for part in path[:-1]:
      if part not in node:
        raise ValueError(f"--{key}: the config has no {part!r}")
      node = node[part]
    if path[-1] not in node:
      raise ValueError(f"--{key}: unknown config key")
    try:
      node[path[-1]] = _parse_value(text, node[path[-1]])
    except (ValueError, SyntaxError, TypeError) as e:
      raise ValueError(f"--{key}={text}: {e}") from None
  return cfg


# The config's paths, each local or in a bucket (see pipeline/paths.py).
PATHS = ("data.train", "data.eval", "tokenizer.path", "train.init_from")


def load(path: str, overrides: list[str] = ()) -> ConfigDict:
  from pipeline import mixture, paths

  cfg = apply_overrides(load_file(path), list(overrides))
  for key in PATHS:
    value = cfg
    for part in key.split("."):
      value = value.get(part) if isinstance(value, ConfigDict) else None
    if value and key == "data.train" and mixture.is_mixture(value):
      value = [spec for _, spec, _ in mixture.parse(value)]
    if value:
      paths.refuse_urls(value, f"config.{key}", buckets=True)
  return cfg
