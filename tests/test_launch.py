"""Several processes on localhost, each with several CPU devices, act as one run
(training as one is in test_equivalence.py)."""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_CONFIG, Output, run_capjax, run_local


def test_eval_visits_every_record_once(trained_run, synthetic_coco, tmp_path):
  """21 records (one unusable) over 1 process and over 2 x 2 devices, with a
  batch that does not divide them: each record captioned once, none lost,
  the same captions either way."""
  run = trained_run
  ann = json.load(open(synthetic_coco / "annotations" / "captions_train.json"))
  names = [im["file_name"] for im in ann["images"][:20]]
  (tmp_path / "broken.jpg").write_bytes(open(synthetic_coco / "train" / names[0], "rb").read()[:300])
  rows = [{"image": str(synthetic_coco / "train" / f), "caption": f"caption {k}"}
          for k, f in enumerate(names)]
  rows.insert(7, {"image": "broken.jpg", "caption": "lost"})
  table = tmp_path / "eval.jsonl"
  table.write_text("".join(json.dumps(r) + "\n" for r in rows))
  args = ["--checkpoint", str(run), "--split", str(table), "--config.eval.batch_size=7"]
  run_capjax("eval", *args, "--out", str(tmp_path / "one"))
  proc = run_local(2, 2, "eval", *args, "--out", str(tmp_path / "two"))
  assert "CIDEr-D" in proc.stdout and "[1] " not in "".join(
      l for l in proc.stdout.splitlines(True) if "CIDEr-D" in l)

  want = [r["image"] for r in rows]
  results = {}
  for name in ("one", "two"):
    preds = [json.loads(l) for l in open(tmp_path / name / "eval_predictions.jsonl")]
    assert [p["id"] for p in preds] == want  # every record, once, in order
    assert [p["id"] for p in preds if "skipped" in p] == ["broken.jpg"]
    metrics = json.load(open(tmp_path / name / "eval_metrics.json"))
    assert metrics["images"] == 20 and metrics["skipped_records"] == 1
    results[name] = ([p["caption"] for p in preds], metrics["cider"])
  assert json.load(open(tmp_path / "two" / "eval_metrics.json"))["processes"] == 2
  assert results["one"] == results["two"]


def test_launcher_usage():
  proc = subprocess.run([os.path.join(REPO, "launch", "local.sh"), "--help"],
                        capture_output=True, text=True)
  assert proc.returncode == 0 and "launch/local.sh N M COMMAND" in proc.stdout
  proc = subprocess.run([os.path.join(REPO, "launch", "local.sh"), "x", "2", "train"],
                        capture_output=True, text=True)
  assert proc.returncode == 2 and "positive integers" in proc.stderr


def _descendants(pid):
  """Process ids below `pid`, read from /proc."""
  parents = {}
  for p in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{p}/stat") as f:
        parents[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
      pass
  out, frontier = [], [pid]
  while frontier:
    kids = [p for p, parent in parents.items() if parent in frontier]
    out += kids
    frontier = kids
  return out


def test_preemption_of_two_processes_checkpoints_one_step(prepared, tmp_path):
  """SIGTERM to every process of a 2 x 2 run: JAX's preemption service agrees
  on a step, both save it and exit 0."""
  proc = subprocess.Popen(
      [os.path.join(REPO, "launch", "local.sh"), "2", "2", "train", "--config", TINY_CONFIG,
       "--workdir", str(tmp_path), f"--config.data.train={prepared['train']}",
       f"--config.data.eval={prepared['val']}", "--config.train.steps=100000",
       "--config.checkpoint.every_steps=100000"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True, env={**os.environ, "CAPJAX_PYTHON": sys.executable})
  out = Output(proc)
  try:
    out.wait_for("step 6/", 600)
    for pid in _descendants(proc.pid):
      try:
        with open(f"/proc/{pid}/cmdline") as f:
          if "trainer.cli" in f.read():
            os.kill(pid, signal.SIGTERM)
      except OSError:
        pass
    rest = out.rest(300)
    assert proc.wait(timeout=60) == 0, rest
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  steps = {l.split("checkpoint at step ")[1].split(";")[0] for l in rest.splitlines()
           if "preempted" in l}
  assert len(steps) == 1 and os.listdir(tmp_path / "checkpoints") == list(steps)


def _launch(script, *args):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args],
                        capture_output=True, text=True, timeout=60)
  return proc


def _bash_parses(script):
  proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr + script


def test_cluster_launchers_have_help_and_need_a_command():
  required = {"tpu.py": ["--tpu", "t", "--zone", "z"], "slurm.py": ["--nodes", "1",
              "--gpus-per-node", "1"], "k8s.py": ["--name", "n", "--image", "i", "--processes", "1"]}
  for script, args in required.items():
    proc = _launch(script, "--help")
    assert proc.returncode == 0 and "--dry-run" in proc.stdout, script
    proc = _launch(script, *args, "--dry-run")
    assert proc.returncode == 2 and "after --" in proc.stderr.splitlines()[-1], script


def test_tpu_dry_run_prints_the_gcloud_commands():
  import shlex

  capjax = ["train", "--config", "configs/coco_pod.py", "--workdir", "/mnt/shared/runs/x",
            "--config.train.steps=10"]
  proc = _launch("tpu.py", "--tpu", "slice-a", "--tpu", "slice-b", "--zone", "us-east5-a",
                 "--project", "proj", "--setup", "--dry-run", "--", *capjax)
  assert proc.returncode == 0, proc.stderr
  cmds = [shlex.split(line) for line in proc.stdout.splitlines()]
  assert cmds[0][:3] == ["git", "-C", REPO] and "archive" in cmds[0]
  gcloud = cmds[1:]
  assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and "--worker=all" in c
             and "--zone=us-east5-a" in c and "--project=proj" in c for c in gcloud)
  remote = {}
  for c in gcloud:
    if c[4] == "ssh":
      script = next(a for a in c if a.startswith("--command="))[len("--command="):]
      _bash_parses(script)
      remote.setdefault(c[5], []).append(script)
    else:
      assert c[4] == "scp" and c[6].endswith(":capjax.tar.gz")
  assert sorted(remote) == ["slice-a", "slice-b"]
  for tpu, scripts in remote.items():
    assert len(scripts) == 3 and "tar -xzf" in scripts[0] and "jax[tpu]" in scripts[1]
    assert shlex.join(capjax) + " --distributed" in scripts[2] and "logs/$(hostname).log" in scripts[2]
    assert 'export LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:-' in scripts[2]
  # every slice has its code and environment before any starts
  verbs = [("run" if "nohup" in " ".join(c) else "prep") for c in gcloud]
  assert verbs == ["prep"] * 6 + ["run"] * 2


def test_slurm_dry_run_prints_a_batch_script():
  import shlex

  proc = _launch("slurm.py", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                 "--time", "02:00:00", "--dry-run", "--", "train", "--config", "c.py",
                 "--workdir", "/shared/run")
  assert proc.returncode == 0, proc.stderr
  script = proc.stdout
  _bash_parses(script)
  directives = [l.split(None, 1)[1] for l in script.splitlines() if l.startswith("#SBATCH")]
  for d in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
            "--time=02:00:00", "--signal=TERM@120", "--requeue"):
    assert d in directives, d
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in script
  srun = shlex.split(next(l for l in script.splitlines() if l.startswith("srun")))
  assert srun[srun.index("-m") + 1:] == ["trainer.cli", "train", "--config", "c.py",
                                         "--workdir", "/shared/run", "--distributed"]


JOBSET_FIELDS = {  # JobSet v1alpha2 (jobset.x-k8s.io), the fields capjax writes may use
    "": {"apiVersion", "kind", "metadata", "spec"},
    "spec": {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy",
             "suspend", "coordinator", "managedBy", "ttlSecondsAfterFinished"},
    "spec.network": {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"},
    "spec.failurePolicy": {"maxRestarts", "restartStrategy", "rules"},
    "spec.replicatedJobs[]": {"name", "template", "replicas", "dependsOn"},
}


def test_the_gpu_xla_flags_are_known_to_xla():
  """The launchers' XLA_FLAGS for GPUs: set unless the job's environment has
  its own, and every one known to XLA, which refuses to start with a flag it
  does not know (as it does here with one made up)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("xla_flags",
                                                os.path.join(REPO, "launch", "xla_flags.py"))
  xla_flags = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(xla_flags)
  line = xla_flags.shell_export("gpu")
  for own, want in (("", " ".join(xla_flags.GPU)), ("--mine", "--mine")):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(["bash", "-c", f'{line}; printf %s "$XLA_FLAGS"'], capture_output=True,
                          text=True, timeout=30, env={**env, **({"XLA_FLAGS": own} if own else {})})
    assert proc.stdout == want
  check = [sys.executable, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"]
  for flags, starts in ((" ".join(xla_flags.GPU), True), ("--xla_gpu_made_up_flag=true", False)):
    proc = subprocess.run(check, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags})
    assert (proc.returncode == 0) == starts, proc.stderr[-2000:]


@pytest.mark.parametrize("accelerator", ["gpu", "tpu"])
def test_kubernetes_dry_run_prints_a_valid_jobset(accelerator):
  from kubernetes import client

  extra = (["--gpus-per-process", "8"] if accelerator == "gpu" else
           ["--tpu-accelerator", "tpu-v5-lite-podslice", "--tpu-topology", "4x4"])
  proc = _launch("k8s.py", "--name", "coco", "--image", "reg/capjax:1", "--processes", "4",
                 "--env-secret", "HF_TOKEN=hf-token", "--pvc", "shared:/mnt/shared", *extra,
                 "--dry-run", "--", "train", "--config", "c.py", "--workdir", "/mnt/shared/run")
  assert proc.returncode == 0, proc.stderr
  m = json.loads(proc.stdout.split("\n", 1)[1])
  assert m["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and m["kind"] == "JobSet"
  assert set(m) <= JOBSET_FIELDS[""] and set(m["spec"]) <= JOBSET_FIELDS["spec"]
  assert set(m["spec"]["network"]) <= JOBSET_FIELDS["spec.network"]
  assert set(m["spec"]["failurePolicy"]) <= JOBSET_FIELDS["spec.failurePolicy"]
  (rjob,) = m["spec"]["replicatedJobs"]
  assert set(rjob) <= JOBSET_FIELDS["spec.replicatedJobs[]"]
  # the Job template against Kubernetes' own models: types checked, and a
  # field they do not know would be lost on the way back
  api = client.ApiClient()
  job = api._ApiClient__deserialize(rjob["template"], "V1JobTemplateSpec")
  assert api.sanitize_for_serialization(job) == rjob["template"]
  spec = rjob["template"]["spec"]
  assert spec["parallelism"] == spec["completions"] == 4 and spec["completionMode"] == "Indexed"
  (container,) = spec["template"]["spec"]["containers"]
  command = container["command"]
  assert command[:6] == ["capjax", "train", "--config", "c.py", "--workdir", "/mnt/shared/run"]
  assert container["volumeMounts"] == [{"name": "volume-0", "mountPath": "/mnt/shared"}]
  assert spec["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "shared"}
  secret = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
  env = {e["name"]: e.get("value") for e in container["env"]}
  assert secret["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
  if accelerator == "gpu":
    assert command[6:] == ["--coordinator", "coco-workers-0-0.coco:1234", "--num-processes",
                           "4", "--process-id", "$(PROCESS_ID)"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
  else:
    assert command[6:] == ["--distributed"]
    assert "--xla_tpu_overlap_compute_collective_tc=true" in env["LIBTPU_INIT_ARGS"]
    assert spec["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4"


def test_slurm_job_command_joins_its_tasks(prepared, trained_run, tmp_path):
  """The srun line of launch/slurm.py, run as SLURM would run its two tasks
  (SLURM's environment on localhost, four CPU devices each): JAX finds the
  processes from the environment, and the losses are a one-process run's
  (the session's trained run, same config)."""
  import shlex

  train = ["train", "--config", TINY_CONFIG, f"--config.data.train={prepared['train']}",
           f"--config.data.eval={prepared['val']}", "--config.train.schedule=constant",
           "--config.train.steps=4", "--config.checkpoint.every_steps=4"]
  script = _launch("slurm.py", "--nodes", "2", "--gpus-per-node", "1", "--venv",
                   os.path.dirname(os.path.dirname(sys.executable)), "--dry-run", "--", *train,
                   "--workdir", str(tmp_path / "two")).stdout
  srun = shlex.split(next(l for l in script.splitlines() if l.startswith("srun")))
  command = srun[next(i for i, a in enumerate(srun) if a.endswith("/python")):]
  cpu = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  tasks = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **cpu, "SLURM_JOB_ID": "4242",
                                            "SLURM_STEP_NODELIST": "localhost",
                                            "SLURM_NTASKS": "2", "SLURM_PROCID": str(i),
                                            "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2"})
           for i in range(2)]
  outs = [t.communicate(timeout=600)[0] for t in tasks]
  assert [t.returncode for t in tasks] == [0, 0], outs
  assert "mesh data 8 x fsdp 1 x tensor 1 on 8 cpu devices, 2 process(es)" in outs[0]

  def losses(run):
    rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
    return [r["train/loss"] for r in rows if "train/loss" in r]

  one, two = losses(trained_run)[:4], losses(tmp_path / "two")
  assert len(two) == 4 and max(abs(a - b) / abs(a) for a, b in zip(one, two)) < 1e-5
