"""Parameters on an 8-device CPU mesh get the shardings the rule table implies.

Runs in a subprocess: the device count is fixed when JAX starts."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, TINY_CONFIG

SCRIPT = textwrap.dedent("""
    import json, jax
    from flax import nnx
    from trainer import config, sharding
    from trainer.models.captioner import build_captioner
    from trainer.params import abstract_model
    cfg = config.load(TINY_CONFIG, ["config.mesh.data=2", "config.mesh.fsdp=2",
                                    "config.mesh.tensor=2", "config.model.scan_layers=" + SCAN])
    cfg.model.decoder.vocab_size = 64
    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, abstract, shardings = abstract_model(cfg, mesh)
    params = jax.jit(lambda: nnx.state(build_captioner(cfg.model, 0)), out_shardings=shardings)()
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
      out[jax.tree_util.keystr(path)] = {
          "spec": [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec],
          "shape": list(x.shape), "shard": list(x.addressable_shards[0].data.shape),
          "devices": len(x.sharding.device_set)}
    # Generation sharded over the batch axes gives what one device gives.
    import numpy as np
    from trainer import generate
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    host = jax.device_get(params)
    same = []
    for beams in (1, 3):
      cfg.eval.num_beams = beams
      sharded = generate.make_generate_fn(graphdef, cfg.eval, 0, 1, 1, shardings,
                                          sharding.batch_sharding(mesh))
      one = generate.make_generate_fn(graphdef, cfg.eval, 0, 1, 1)
      a = sharded(params, jax.device_put(images, sharding.batch_sharding(mesh)))
      assert len(a.sharding.device_set) == 8
      same.append(bool((np.asarray(a) == np.asarray(one(host, images))).all()))
    out["generate_equal"] = same
    print(json.dumps(out))
""")


@pytest.mark.parametrize("scan", [False, True], ids=["listed", "scanned"])
def test_parameters_follow_the_rule_table(scan):
  """With scan_layers the stacked layer axis comes first and is replicated."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  script = f"TINY_CONFIG, SCAN = {TINY_CONFIG!r}, {str(scan).lower()!r}\n" + SCRIPT
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  params = json.loads(proc.stdout.strip().splitlines()[-1])
  assert params.pop("generate_equal") == [True, True]  # greedy, beams

  def find(*words):
    hits = [v for k, v in params.items() if all(w in k for w in words)]
    assert hits, words
    if scan:  # inside a layer stack: a leading layer axis, replicated
      stacked = [k for k in params if all(w in k for w in words)
                 and ("['layers']" in k or "['h']" in k)]
      for k in stacked:
        p = params[k]
        assert p["spec"][:1] in ([], [None]) and p["shard"][0] == p["shape"][0] == 1
        p.update(spec=p["spec"][1:], shape=p["shape"][1:], shard=p["shard"][1:])
    return hits

  # rules: embed -> fsdp, heads/mlp/vocab -> tensor, norm -> replicated
  for p in find("'wte'", "embedding"):  # (vocab, embed)
    assert p["spec"] == ["tensor", "fsdp"] and p["shard"] == [32, 16]
  for p in find("'query'", "kernel"):  # (embed, heads)
    assert p["spec"] == ["fsdp", "tensor"]
    assert p["shard"] == [p["shape"][0] // 2, p["shape"][1] // 2]
  for p in find("'out'", "kernel"):  # (heads, embed)
    assert p["spec"] == ["tensor", "fsdp"]
  for p in find("'fc'", "kernel"):  # (embed, mlp)
    assert p["spec"] == ["fsdp", "tensor"]
  for p in find("'fc'", "bias"):  # (mlp,)
    assert p["spec"] == ["tensor"]
  for p in find("layernorm", "scale"):  # (norm,)
    assert p["spec"] in ([], [None]) and p["shard"] == p["shape"]
  for p in find("patch_embed", "kernel"):  # (None, None, None, embed)
    assert p["spec"] == [None, None, None, "fsdp"]
  assert all(p["devices"] == 8 for p in params.values())
  stacks = [k for k in params if "['layers']" in k or "['h']" in k]
  assert stacks and all(params[k]["shape"] != [] for k in stacks)


SLICES = textwrap.dedent("""
    import json, jax
    from ml_collections import ConfigDict
    from trainer import sharding
    # two "slices" of four devices, as TPU multi-slice reports them
    slice_of = lambda d: d.id // 4
    out = {}
    for data, fsdp, tensor in ((-1, 2, 1), (2, 2, 2), (4, 1, 2)):
      mesh = sharding.make_mesh(ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)),
                                slice_of=slice_of)
      out[f"{data},{fsdp},{tensor}"] = [[slice_of(d) for d in row.ravel()] for row in mesh.devices]
    try:
      sharding.make_mesh(ConfigDict(dict(data=1, fsdp=4, tensor=2)), slice_of=slice_of)
    except ValueError as e:
      out["error"] = str(e)
    print(json.dumps(out))
""")


def test_multislice_mesh_spans_slices_with_data_parallelism_only():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SLICES], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  # rows are data indices: each holds one slice only, the first half slice 0
  assert out["-1,2,1"] == [[0, 0], [0, 0], [1, 1], [1, 1]]
  assert out["2,2,2"] == [[0, 0, 0, 0], [1, 1, 1, 1]]
  assert out["4,1,2"] == [[0, 0], [0, 0], [1, 1], [1, 1]]
  assert "does not divide over 2 slices" in out["error"]
