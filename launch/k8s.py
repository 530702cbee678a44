#!/usr/bin/env python3
"""Runs one capjax command on Kubernetes as a JobSet: N pods, one capjax
process each, restarted together after a failure or preemption (the run
resumes from its run directory, on a volume all pods mount: --pvc).

  launch/k8s.py --name coco --image REGISTRY/capjax:TAG --processes 4 \\
      --gpus-per-process 8 -- train --config configs/coco_vit_gpt2.py \\
      --workdir /mnt/shared/runs/coco --pvc shared:/mnt/shared

Prints the manifest (JSON, which kubectl reads as YAML) with --dry-run, or
applies it with `kubectl apply -f -`. GPU pods find each other through the
JobSet's headless service: process 0's pod is the coordinator and each pod's
completion index its process id. TPU pods (--tpu-accelerator, on GKE) take
`--distributed`: JAX reads the slice from the TPU environment. The JobSet
controller must be installed in the cluster. The pods' environment carries
the XLA flags of launch/xla_flags.py for their chips. No secrets go into the manifest:
name a Kubernetes Secret with --env-secret to pass e.g. HF_TOKEN.
"""

import argparse
import json
import shlex
import subprocess
import sys

import command_line
import xla_flags

PORT = 1234


def manifest(args: argparse.Namespace) -> dict:
  job = "workers"
  capjax = ["capjax", *args.command]
  if args.tpu_accelerator:
    capjax.append("--distributed")
  else:  # the first pod of the first job, by the JobSet's DNS names
    capjax += ["--coordinator", f"{args.name}-{job}-0-0.{args.name}:{PORT}",
               "--num-processes", str(args.processes), "--process-id", "$(PROCESS_ID)"]
  env = [{"name": "PROCESS_ID", "valueFrom": {"fieldRef": {
      "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}]
  platform = "tpu" if args.tpu_accelerator else "gpu" if args.gpus_per_process else None
  if platform:  # the XLA flags of launch/xla_flags.py, as a plain value to edit
    env.append({"name": xla_flags.VARIABLE[platform], "value": " ".join(xla_flags.FLAGS[platform])})
  for item in args.env_secret:
    var, _, ref = item.partition("=")
    secret, _, key = ref.partition(":")
    env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key or var}}})
  limits = {}
  mounts, volumes = [], []
  for i, item in enumerate(args.pvc):
    claim, _, path = item.partition(":")
    mounts.append({"name": f"volume-{i}", "mountPath": path})
    volumes.append({"name": f"volume-{i}", "persistentVolumeClaim": {"claimName": claim}})
  pod = {"restartPolicy": "Never",
         # SIGTERM first: capjax checkpoints the step it is at, then exits
         "terminationGracePeriodSeconds": args.grace_seconds,
         "containers": [{"name": "capjax", "image": args.image, "command": capjax, "env": env,
                         "ports": [{"containerPort": PORT}], "volumeMounts": mounts,
                         "resources": {"limits": limits}}], "volumes": volumes}
  if args.tpu_accelerator:
    limits["google.com/tpu"] = str(args.tpu_chips_per_process)  # quantities are strings
    pod["nodeSelector"] = {"cloud.google.com/gke-tpu-accelerator": args.tpu_accelerator,
                           "cloud.google.com/gke-tpu-topology": args.tpu_topology}
  elif args.gpus_per_process:
    limits["nvidia.com/gpu"] = str(args.gpus_per_process)
  meta = {"name": args.name, **({"namespace": args.namespace} if args.namespace else {})}
  return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": meta,
          "spec": {"failurePolicy": {"maxRestarts": args.max_restarts},
                   "network": {"enableDNSHostnames": True},
                   "replicatedJobs": [{"name": job, "replicas": 1, "template": {"spec": {
                       "parallelism": args.processes, "completions": args.processes,
                       "completionMode": "Indexed", "backoffLimit": 0,
                       "template": {"spec": pod}}}}]}}


def _flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--name", required=True, help="JobSet name (DNS label)")
  p.add_argument("--image", required=True, help="container image with capjax installed")
  p.add_argument("--processes", type=int, required=True, help="pods, one process each")
  p.add_argument("--gpus-per-process", type=int, default=0)
  p.add_argument("--tpu-accelerator", help="GKE TPU type, e.g. tpu-v5-lite-podslice")
  p.add_argument("--tpu-topology", help="GKE TPU topology, e.g. 4x4")
  p.add_argument("--tpu-chips-per-process", type=int, default=4)
  p.add_argument("--namespace")
  p.add_argument("--max-restarts", type=int, default=10, help="JobSet restarts after failures "
                 "and preemptions (default: 10)")
  p.add_argument("--grace-seconds", type=int, default=300, help="between SIGTERM and SIGKILL "
                 "(default: 300)")
  p.add_argument("--pvc", action="append", default=[], metavar="CLAIM:PATH",
                 help="mount a PersistentVolumeClaim (shared storage for the run directory and "
                 "the data) at PATH in every pod (repeatable)")
  p.add_argument("--env-secret", action="append", default=[], metavar="VAR=SECRET[:KEY]",
                 help="an environment variable from a Kubernetes Secret (repeatable)")


def main(argv=None) -> int:
  args = command_line.parse("launch/k8s.py", __doc__, _flags,
                            "train --config C --workdir /mnt/shared/run", argv)
  if args.processes < 1:
    args.error("--processes must be at least 1")
  if bool(args.tpu_accelerator) != bool(args.tpu_topology):
    args.error("--tpu-accelerator and --tpu-topology go together")
  if any(":" not in v or not v.partition(":")[2].startswith("/") for v in args.pvc):
    args.error("--pvc takes CLAIM:/absolute/path")
  text = json.dumps(manifest(args), indent=2) + "\n"
  apply = ["kubectl", "apply", "-f", "-"]
  if args.dry_run:
    print(f"# the manifest, for {shlex.join(apply)}")
    print(text, end="")
    return 0
  return subprocess.run(apply, input=text, text=True).returncode


if __name__ == "__main__":
  sys.exit(main())
