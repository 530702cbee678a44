"""trainer.host_memory: the next call reuses the last call's scratch pages."""

import json
import subprocess
import sys

from tests.conftest import REPO

# A jitted function whose 64 MB intermediates live in XLA's scratch memory,
# called again and again as a train step is; the page faults of each call.
PROGRAM = """
import json, resource, sys
from trainer import host_memory
keep = sys.argv[1] == "keep"
applied = host_memory.share_one_arena() if keep else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x)).sum())
x = jnp.ones((4096, 4096))
faults = []
for i in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  if i == 0 and keep:
    applied = applied and host_memory.keep_freed_memory()
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _faults(mode: str) -> dict:
  proc = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin"})
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kept_memory_spares_the_page_faults_of_each_call():
  kept, plain = _faults("keep"), _faults("plain")
  assert kept["applied"]
  scratch_pages = 2 * 4096 * 4096 * 4 // 4096  # the two intermediates, in 4 KiB pages
  # Without it every call maps its scratch (and the products' packing buffers)
  # afresh and faults on each page.
  assert min(plain["faults"][1:]) >= scratch_pages, plain
  # With it the calls after the first mostly reuse the first's pages.
  assert 10 * sum(kept["faults"][1:]) < sum(plain["faults"][1:]), (kept, plain)
