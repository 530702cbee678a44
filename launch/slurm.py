#!/usr/bin/env python3
"""Submits one capjax command to a SLURM GPU cluster: one process per node,
each with all of its node's GPUs.

  launch/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
      -- train --config configs/coco_vit_gpt2.py --workdir /shared/runs/coco

Writes nothing: the batch script goes to `sbatch` on its standard input
(--dry-run prints it instead). The job runs `srun capjax ... --distributed`
from this checkout (the cluster's shared file system), with the Python of
--venv; JAX reads the node list, the process count and each process's rank
from SLURM's environment, and the GPU XLA flags of launch/xla_flags.py
unless XLA_FLAGS is set. SLURM's SIGTERM before the time limit and on
preemption makes capjax checkpoint and exit; --requeue (default) puts the job
back in the queue, and it resumes from the run directory.
"""

import argparse
import os
import shlex
import subprocess
import sys

import command_line
import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batch_script(args: argparse.Namespace) -> str:
  directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1",
                f"--gpus-per-node={args.gpus_per_node}", f"--time={args.time}",
                f"--output={args.logs}/%x-%j.out",
                # SIGTERM to every task two minutes before the time limit: time to save
                "--signal=TERM@120"]
  if args.cpus_per_node:
    directives.append(f"--cpus-per-task={args.cpus_per_node}")
  for flag in ("partition", "account", "qos"):
    if getattr(args, flag):
      directives.append(f"--{flag}={getattr(args, flag)}")
  directives.append("--requeue" if args.requeue else "--no-requeue")
  python = os.path.join(args.venv, "bin", "python")
  run = ["srun", "--kill-on-bad-exit=1", f"--output={args.logs}/%x-%j-%t.log",
         python, "-m", "trainer.cli", *args.command, "--distributed"]
  return "\n".join(["#!/bin/bash", *(f"#SBATCH {d}" for d in directives),
                    "set -euo pipefail", f"cd {shlex.quote(REPO)}", xla_flags.shell_export("gpu"),
                    f"mkdir -p {shlex.quote(args.logs)}", shlex.join(run), ""])


def _flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--nodes", type=int, required=True)
  p.add_argument("--gpus-per-node", type=int, required=True)
  p.add_argument("--cpus-per-node", type=int, help="CPUs for the process of each node "
                 "(input pipeline workers)")
  p.add_argument("--time", default="24:00:00", help="time limit (default: 24:00:00)")
  p.add_argument("--partition")
  p.add_argument("--account")
  p.add_argument("--qos")
  p.add_argument("--job-name", default="capjax")
  p.add_argument("--logs", default=os.path.join(REPO, "logs"), help="folder for the job's "
                 "and each task's logs (default: logs/ in this checkout)")
  p.add_argument("--venv", default=os.path.join(REPO, ".venv"), help="environment with "
                 "capjax and jax[cuda] (default: .venv in this checkout)")
  p.add_argument("--no-requeue", dest="requeue", action="store_false",
                 help="do not requeue after preemption")


def main(argv=None) -> int:
  args = command_line.parse("launch/slurm.py", __doc__, _flags,
                            "train --config C --workdir /shared/run", argv)
  if args.nodes < 1 or args.gpus_per_node < 1:
    args.error("--nodes and --gpus-per-node must be at least 1")
  script = batch_script(args)
  if args.dry_run:
    print("# the batch script, for sbatch on its standard input")
    print(script, end="")
    return 0
  return subprocess.run(["sbatch"], input=script, text=True).returncode


if __name__ == "__main__":
  sys.exit(main())
