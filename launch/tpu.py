#!/usr/bin/env python3
"""Runs one capjax command on every worker of one or more TPU VM slices.

  launch/tpu.py --tpu NAME --zone ZONE [--project P] [--setup] -- train \\
      --config configs/coco_pod.py --workdir /mnt/shared/runs/coco

Steps, each a gcloud command run from here (--dry-run prints them instead):
  1. the code: this checkout's committed tree (git archive), copied to every
     worker and unpacked in ~/capjax;
  2. with --setup, the environment: a venv with capjax and jax[tpu];
  3. the command on all workers at once, detached, with `--distributed` (JAX
     finds the pod's processes itself) and the TPU flags of
     launch/xla_flags.py unless LIBTPU_INIT_ARGS is set, each worker logging
     to ~/capjax/logs/<worker hostname>.log.
Several --tpu flags run one job over several slices (multi-slice, slices made
together as a queued resource): JAX numbers the slices, and capjax's mesh
puts data parallelism across them and everything else inside each.
The run directory and the data must be folders that every worker sees at
the same path (a Filestore share, or a bucket mounted with gcsfuse).
No credentials are written anywhere: gcloud uses its own login.
"""

import argparse
import os
import shlex
import subprocess
import sys
import time

import command_line
import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_TPU = "jax[tpu]>=0.10.2,<0.11"  # the jax of setup.py, with the TPU runtime


def gcloud(args: argparse.Namespace, verb: str, *operands: str) -> list[str]:
  """`gcloud compute tpus tpu-vm VERB OPERANDS...` on all workers."""
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *operands, "--worker=all",
         f"--zone={args.zone}"]
  return cmd + ([f"--project={args.project}"] if args.project else [])


def commands(args: argparse.Namespace, archive: str) -> list[list[str]]:
  run = (f"cd ~/capjax && mkdir -p logs && {xla_flags.shell_export('tpu')} && "
         f"nohup setsid .venv/bin/capjax "
         f"{shlex.join(args.command)} --distributed "
         f"> logs/$(hostname).log 2>&1 < /dev/null &")
  setup = ("cd ~/capjax && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && "
           f".venv/bin/pip install -q -e . {shlex.quote(JAX_TPU)}")
  unpack = ("mkdir -p ~/capjax && find ~/capjax -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs "
            "-exec rm -rf {} + && tar -xzf ~/capjax.tar.gz -C ~/capjax && rm ~/capjax.tar.gz")
  out = [["git", "-C", REPO, "archive", "--format=tar.gz", "-o", archive, "HEAD"]]
  for tpu in args.tpu:
    out.append(gcloud(args, "scp", archive, f"{tpu}:capjax.tar.gz"))
    out.append(gcloud(args, "ssh", tpu, f"--command={unpack}"))
    if args.setup:
      out.append(gcloud(args, "ssh", tpu, f"--command={setup}"))
  for tpu in args.tpu:  # all slices set up before any starts
    out.append(gcloud(args, "ssh", tpu, f"--command={run}"))
  return out


def _flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--tpu", action="append", required=True, help="TPU VM name (repeat: one per "
                 "slice of a multi-slice job)")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", help="Google Cloud project (default: gcloud's)")
  p.add_argument("--setup", action="store_true", help="also create the venv on every worker")


def main(argv=None) -> int:
  args = command_line.parse("launch/tpu.py", __doc__, _flags,
                            "train --config C --workdir /mnt/shared/run", argv)
  archive = f"/tmp/capjax-{os.getpid()}-{int(time.time())}.tar.gz"
  for cmd in commands(args, archive):
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      subprocess.run(cmd, check=True)
  if not args.dry_run:
    os.unlink(archive)
    print(f"running; logs: gcloud compute tpus tpu-vm ssh {args.tpu[0]} --zone={args.zone} "
          "--worker=all --command='tail -n 5 ~/capjax/logs/*.log'")
  return 0


if __name__ == "__main__":
  sys.exit(main())
