"""The `capjax` command: prepare, train, eval, predict, caption, metrics, import-hf,
export-hf.

Configs are Python files (`--config configs/demo.py`, or a name from
`configs/`), overridden with `--config.KEY=VALUE`. Bad input ends the command
with a one-line reason and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from trainer import peers

# TensorFlow is here only for TensorBoard writers: keep its start-up chatter
# (and oneDNN's, which it would not use) off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Grain leaves the batches still prefetched in shared memory at exit for the
# resource tracker (a separate process, hence the environment) to remove; it
# does, but warns about each.
os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:multiprocessing.resource_tracker")


CHECKPOINT_HELP = ("run directory (its latest checkpoint) or one checkpoint step folder; "
                   "local, gs:// or s3://")


class _Parser(argparse.ArgumentParser):
  """Errors as one line: `capjax <command>: error: <reason>`."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  rest, overrides = [], []
  for a in argv:
    (overrides if a.startswith("--config.") else rest).append(a)
  return rest, [o[2:] for o in overrides]


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="capjax", description="Train, evaluate and run image-captioning "
              "models (ViT + GPT-2) in JAX, from one CPU to multi-host pods.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

  s = sub.add_parser("prepare", help="caption data (COCO, Karpathy, tables, WebDataset, Parquet, "
                     "TFDS, HF datasets) to ArrayRecord shards",
                     description="Reads images and captions and writes ArrayRecord shards "
                     "with a manifest, streaming, one shard per unit of input. Every image is "
                     "decoded once; unusable ones are skipped and reported by reason. Run again "
                     "after a stop, it writes only the shards not yet written.")
  s.add_argument("source", help="COCO caption JSON, Karpathy dataset_coco.json, CSV/JSON/JSONL "
                 "table, WebDataset .tar or Parquet files (a folder, a glob or a brace pattern "
                 "such as 'cc3m/{00000..00331}.tar'), tfds:NAME, hf:NAME (a datasets folder or "
                 "a Hub dataset in the local cache), or a prepared folder (local, gs:// or s3://)")
  s.add_argument("--out", required=True, help="output folder, local, gs://BUCKET/PATH or "
                 "s3://BUCKET/PATH; the manifest is written last")
  s.add_argument("--images", help="image folder of a COCO file, or the COCO root of a Karpathy "
                 "file (default: the JSON's folder)")
  s.add_argument("--split", help="Karpathy: train, restval, val or test, joined with + "
                 "(default: train); tfds:/hf: the split (default: train)")
  s.add_argument("--image-column", help="table, Parquet or hf: column with images (paths "
                 "relative to the table; default: image, or Parquet's jpg)")
  s.add_argument("--caption-column", help="table, Parquet or hf: column with a caption or a "
                 "list of captions (default: caption, or Parquet's txt); WebDataset: a field of "
                 "each sample's .json, nested with / (default: the .txt)")
  s.add_argument("--id-column", help="Parquet: record ids (default: key, else FILE/ROW)")
  s.add_argument("--data-dir", help="tfds: the TFDS data directory")
  s.add_argument("--image-key", default="image", help="tfds: image feature (default: image)")
  s.add_argument("--captions-key", default="captions/text", help="tfds: captions feature, "
                 "nested with / (default: captions/text)")
  s.add_argument("--id-key", default="image/id", help="tfds: id feature (default: image/id)")
  s.add_argument("--resize-shorter", type=int, default=0, metavar="N", help="shrink images "
                 "whose shorter side exceeds N pixels to N, stored as JPEG (default: keep)")
  s.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of shrunk images "
                 "(default: 90)")
  s.add_argument("--num-shards", type=int, default=None, help="shards of a random-access source "
                 "(default: one per 10,000 records, at least 8); .tar and Parquet input: one "
                 "shard per file")
  s.add_argument("--workers", type=int, default=None,
                 help="worker processes (default: all cores; 1: prepare's own process)")
  s.add_argument("--runner", choices=("local", "beam"), default="local", help="local: worker "
                 "processes on this machine; beam: an Apache Beam pipeline (pip install "
                 "'capjax[beam]'; see docs/prepare.md)")
  s.add_argument("--beam-options", default="", metavar="'--runner=... ...'", help="Beam "
                 "pipeline options (default: FnApiRunner with --workers processes here)")

  s = sub.add_parser("train", help="train a captioner (resumes in an existing workdir)",
                     description="Trains with the given config; per-step scalars go to "
                     "WORKDIR/metrics.jsonl and TensorBoard. Override config keys with "
                     "--config.KEY=VALUE.")
  s.add_argument("--config", required=True, help="config file, or a name from configs/")
  s.add_argument("--workdir", required=True, help="run directory: local, gs://BUCKET/PATH or "
                 "s3://BUCKET/PATH (see the README's table)")
  _distributed_flags(s)

  s = sub.add_parser("eval", help="caption a split and score BLEU, ROUGE-L, CIDEr-D",
                     description="Captions every record once (over all processes) and "
                     "writes eval_predictions.jsonl and eval_metrics.json. Override the "
                     "checkpoint's config with --config.KEY=VALUE.")
  s.add_argument("--checkpoint", required=True,
                 help=CHECKPOINT_HELP)
  s.add_argument("--split", help="source to evaluate, as `prepare` takes it (default: the "
                 "config's data.eval, with data.eval_split)")
  s.add_argument("--out", help="folder for the outputs, local or in a bucket (default: the run "
                 "directory)")
  _distributed_flags(s)

  s = sub.add_parser("predict", help="caption image files, to JSONL",
                     description="Writes one JSON object per image: image, caption, token_ids.")
  s.add_argument("images", nargs="+", help="image files")
  s.add_argument("--checkpoint", required=True,
                 help=CHECKPOINT_HELP)
  s.add_argument("--output", required=True, help="JSONL file to write (local, gs:// or s3://)")
  s.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
  _decoding_flags(s)

  s = sub.add_parser("caption", help="recaption a whole image set, one Parquet file per input "
                     "unit", description="Captions every image of the sources (as `prepare` "
                     "reads them) into OUT/NAME.parquet per input file (00042.tar: "
                     "00042.parquet) or per 10,000 records: key, caption, logprob (its mean "
                     "token log-probability), org_caption (the source's own caption, or empty) "
                     "and the checkpoint step; unusable images are skipped and counted in "
                     "OUT/manifest.json. Each host takes its share of the units; run again, it "
                     "writes only the units not yet written.")
  s.add_argument("sources", nargs="+", metavar="SOURCE", help="WebDataset .tar or Parquet "
                 "files (a folder, a glob or a brace pattern), a prepared folder, a CSV/JSON/"
                 "JSONL table or a COCO caption JSON")
  s.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
  s.add_argument("--out", required=True, help="output folder (local)")
  s.add_argument("--batch-size", type=int, default=32, help="images per batch, rounded up to "
                 "a multiple of this host's devices (default: 32)")
  _decoding_flags(s)
  s.add_argument("--process-index", type=int, help="this host's share: units i with "
                 "i %% count == index (default: SLURM_PROCID, TPU_WORKER_ID, else 0)")
  s.add_argument("--process-count", type=int, help="hosts sharing the units (default: "
                 "SLURM_NTASKS, the TPU VM's workers, else 1)")
  s.add_argument("--images", help="image folder of a COCO caption JSON")
  s.add_argument("--image-column", help="table or Parquet column with images")
  s.add_argument("--caption-column", help="table or Parquet column with the source's own "
                 "captions; WebDataset: a field of each sample's .json (default: the .txt)")
  s.add_argument("--id-column", help="Parquet: record keys (default: key, else FILE/ROW)")

  s = sub.add_parser("metrics", help="score caption predictions against references (COCO "
                     "caption evaluation), to JSON",
                     description="Prints one JSON object: bleu1..bleu4, rouge_l and cider as the "
                     "COCO caption evaluation (pycocoevalcap) computes them, tokenization "
                     "included, and meteor where Java and pycocoevalcap are installed (listed "
                     "under `skipped` otherwise). Every reference image needs exactly one "
                     "prediction.")
  s.add_argument("--predictions", required=True, help="JSONL with `image` and `caption` per "
                 "line, as `predict` writes it")
  s.add_argument("--references", required=True, help="COCO caption annotations JSON (images "
                 "matched by id or file name) or a JSON object {image: [captions]}")
  s.add_argument("--no-meteor", action="store_true", help="do not compute METEOR (it runs "
                 "pycocoevalcap's Java jar)")
  s.add_argument("--rouge-score", action="store_true", help="also ROUGE-1, ROUGE-2 and "
                 "ROUGE-Lsum x100 through rouge_score, as the old Flax script reported them")
  s.add_argument("--out", help="also write the JSON object to this file (local, gs:// or s3://)")

  s = sub.add_parser("import-hf", help="a Hugging Face captioner (ViT, DeiT, CLIP, SigLIP or "
                     "DINOv2 encoder + GPT-2) to a capjax run directory",
                     description="Reads a VisionEncoderDecoderModel folder (HF_DIR), or an "
                     "encoder and a GPT-2 decoder (cross-attention newly initialised), with "
                     "their tokenizer and image processor settings; safetensors weights (a .bin "
                     "only through PyTorch's weights_only loader). The other config sections "
                     "come from --config, overridable with --config.KEY=VALUE.")
  s.add_argument("hf_dir", nargs="?", help="VisionEncoderDecoderModel folder")
  s.add_argument("--encoder", help="encoder model folder, by its config.json's model_type: "
                 "vit, deit, clip_vision_model, siglip_vision_model, dinov2, "
                 "dinov2_with_registers, or a whole clip or siglip model (its vision tower "
                 "is taken) (with --decoder)")
  s.add_argument("--decoder", help="GPT-2 model folder, with the tokenizer (with --encoder)")
  s.add_argument("--out", required=True, help="run directory to write: local (replaced when "
                 "complete), or a new folder in gs:// or s3:// (complete with its checkpoint)")
  s.add_argument("--config", default="demo", help="config for data, train, eval and mesh "
                 "(default: demo)")
  s.add_argument("--image-size", type=int, help="input size, when it should differ from the "
                 "checkpoint's (position embeddings are interpolated)")

  s = sub.add_parser("export-hf", help="a capjax checkpoint to a Hugging Face folder",
                     description="Writes config.json, model.safetensors, tokenizer files, "
                     "preprocessor_config.json and generation_config.json, loadable by "
                     "transformers' VisionEncoderDecoderModel.from_pretrained. LoRA adapters "
                     "are merged into the weights (or kept apart with --peft).")
  s.add_argument("checkpoint", help=CHECKPOINT_HELP)
  s.add_argument("--out", required=True, help="folder to write (replaced when complete); in "
                 "gs:// or s3://, config.json is uploaded last")
  s.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to this Hub repository "
                 "(token from the HF_TOKEN environment variable)")
  s.add_argument("--peft", action="store_true", help="a LoRA checkpoint's adapters apart, in "
                 "peft's format, in OUT/adapter (PeftModel.from_pretrained(model, OUT/adapter)), "
                 "and its base weights in OUT; without it they are merged into the weights")
  return p


def _prepare(args) -> int:
  from pipeline import prepare, sources

  source = sources.open_source(
      args.source, args.images, args.split, args.image_column, args.caption_column,
      args.data_dir, args.image_key, args.captions_key, args.id_key, args.id_column)
  summary = prepare.prepare(source, args.out, args.num_shards, args.workers,
                            args.resize_shorter, args.jpeg_quality, args.runner,
                            args.beam_options)
  print(json.dumps(summary))
  return 0


def _decoding_flags(s) -> None:
  s.add_argument("--num-beams", type=int, help="beam search width (default: the config's "
                 "eval.num_beams; 1 is greedy)")
  s.add_argument("--max-length", type=int, help="most tokens per caption (default: the "
                 "config's eval.max_length)")
  s.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this "
                 "size (default: the config's eval.no_repeat_ngram_size; 0 is off)")


def _with_decoding(args, overrides: list[str]) -> list[str]:
  """The decoding flags given, as overrides of the checkpoint's eval section."""
  return [*overrides, *(f"config.eval.{flag}={getattr(args, flag)}"
                        for flag in ("num_beams", "max_length", "no_repeat_ngram_size")
                        if getattr(args, flag) is not None)]


def _distributed_flags(s) -> None:
  g = s.add_argument_group("multi-process runs (see launch/)")
  g.add_argument("--distributed", action="store_true", help="join the other processes as "
                 "jax.distributed finds them itself (TPU pods, SLURM)")
  g.add_argument("--coordinator", help="HOST:PORT of process 0, for jax.distributed")
  g.add_argument("--num-processes", type=int, help="processes in the run")
  g.add_argument("--process-id", type=int, help="this process's index")
  g.add_argument("--peer-timeout", type=float, default=60.0, metavar="SECONDS",
                 help="stop when another process of the run has not been heard from for "
                 "this long, with exit code %d (0: wait for JAX's own abort; default 60)"
                 % peers.EXIT_CODE)


def _init_distributed(args, workdir: str | None = None) -> None:
  """Joins the run's other processes; with a `workdir` (training), a fatal
  error in JAX's runtime is reported in one line (see stderr_guard)."""
  given = [a is not None for a in (args.coordinator, args.num_processes, args.process_id)]
  if args.distributed and any(given):
    raise ValueError("--distributed finds the processes itself: give it without --coordinator, "
                     "--num-processes and --process-id")
  if not (args.distributed or any(given)):
    return
  if not args.distributed and not all(given):
    raise ValueError("--coordinator, --num-processes and --process-id go together")
  import jax
  heartbeat = peers.jax_heartbeat(args.peer_timeout)
  if args.distributed:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
  else:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               heartbeat_timeout_seconds=heartbeat)
  peers.watch(args.peer_timeout)
  if workdir is not None and jax.process_count() > 1:
    from pipeline import fs
    from trainer import stderr_guard
    stderr_guard.start(fs.absolute(workdir), jax.process_index(), jax.process_count(),
                       peers.coordinator())


def _train(args, overrides) -> int:
  from trainer import config, train

  _init_distributed(args, args.workdir)
  cfg = train.inherit_from_checkpoint(config.load(args.config, overrides), overrides)
  train.train(cfg, args.workdir)
  return 0


def _eval(args, overrides) -> int:
  from trainer import evaluate

  _init_distributed(args)
  m = evaluate.evaluate(args.checkpoint, args.split, args.out, overrides)
  if m is None:  # not process 0: it wrote and prints
    return 0
  for s in m.pop("samples"):
    print(f"image {s['id']}\n  predicted: {s['caption']}")
    for r in s["references"][:2]:
      print(f"  reference: {r}")
  print(json.dumps(m))
  print(f"BLEU-4 {m['bleu4']:.3f}  ROUGE-L {m['rouge_l']:.3f}  CIDEr-D {m['cider']:.3f}")
  if "baseline_cider" in m:
    ratio = m["cider"] / m["baseline_cider"] if m["baseline_cider"] else float("inf")
    print(f"baseline CIDEr-D {m['baseline_cider']:.3f} (every image captioned "
          f"\"{m['baseline_caption']}\"): the model scores {ratio:.1f}x")
  if "content_accuracy" in m:
    print(f"content accuracy {m['content_accuracy']:.3f} (captions naming every shape "
          "with its size, colour and kind, and the count)")
  return 0


def _predict(args, overrides) -> int:
  from pipeline import fs
  from trainer.inference import TrainedCaptioner

  for path in args.images:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file")
  model = TrainedCaptioner(args.checkpoint, _with_decoding(args, overrides))

  def batches():
    for i in range(0, len(args.images), args.batch_size):
      chunk = args.images[i:i + args.batch_size]
      blobs = []
      for path in chunk:
        with open(path, "rb") as f:
          blobs.append((path, f.read()))
      yield blobs

  lines = []
  paths = iter(args.images)
  for captions, ids in model.caption_batches(batches()):
    for caption, row in zip(captions, ids.tolist()):
      row = row[:row.index(model.eos) + 1] if model.eos in row else row
      lines.append(json.dumps({"image": next(paths), "caption": caption, "token_ids": row}))
  fs.write_text(args.output, "".join(l + "\n" for l in lines))
  print(f"wrote {len(lines)} captions to {args.output}")
  return 0


def _caption(args, overrides) -> int:
  from trainer import caption

  options = {k: getattr(args, k) for k in ("images", "image_column", "caption_column",
                                           "id_column")}
  manifest = caption.caption(args.checkpoint, args.sources, args.out,
                             _with_decoding(args, overrides), args.batch_size,
                             args.process_index, args.process_count, options)
  print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}))
  return 0


def _metrics(args, overrides) -> int:
  from pipeline import fs
  from trainer.metrics import score_files

  if overrides:
    raise ValueError("metrics takes no --config overrides")
  scores = score_files.score_files(args.predictions, args.references, not args.no_meteor,
                                   args.rouge_score)
  text = json.dumps(scores)
  if args.out:
    fs.write_text(args.out, text + "\n")
  print(text)
  return 0


def _import_hf(args, overrides) -> int:
  from trainer.hf import importer

  for folder in (args.hf_dir, args.encoder, args.decoder):
    if folder is not None and not os.path.isdir(folder):
      raise FileNotFoundError(f"{folder}: no such directory")
  cfg = importer.import_hf(args.out, args.hf_dir, args.encoder, args.decoder, args.config,
                           overrides, args.image_size)
  print(f"wrote {args.out}: {cfg.model.encoder.model_type} "
        f"{cfg.model.encoder.num_hidden_layers} x "
        f"{cfg.model.encoder.hidden_size}, GPT-2 {cfg.model.decoder.n_layer} x "
        f"{cfg.model.decoder.n_embd}, images {cfg.data.image_size}px")
  return 0


def _export_hf(args, overrides) -> int:
  from pipeline import fs
  from trainer.hf import exporter

  if overrides:
    raise ValueError("export-hf takes no --config overrides")
  if args.push_to_hub:
    if fs.is_bucket(args.out):
      raise ValueError(f"--push-to-hub uploads a local folder: give a local --out, not {args.out}")
    exporter.hub_token()  # before the export: a missing token costs nothing
  out = exporter.export_hf(args.checkpoint, args.out, peft=args.peft)
  print(f"wrote {out}")
  if args.push_to_hub:
    print(exporter.push_to_hub(out, args.push_to_hub))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  if overrides and args.command == "prepare":
    print("capjax prepare: error: takes no --config overrides", file=sys.stderr)
    return 2
  # Grain's worker processes read absl flags; capjax parses its own.
  from absl import flags, logging as absl_logging
  flags.FLAGS.mark_as_parsed()
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's notes on routine calls
  if args.command == "train":
    from trainer import host_memory
    host_memory.share_one_arena()  # before JAX starts its threads
  try:
    _refuse_urls(args)
    if args.command == "prepare":
      return _prepare(args)
    commands = {"train": _train, "eval": _eval, "predict": _predict, "caption": _caption,
                "metrics": _metrics,
                "import-hf": _import_hf, "export-hf": _export_hf}
    return commands[args.command](args, overrides)
  except (OSError, ValueError, KeyError) as e:
    msg = e.args[0] if e.args else str(e)
    print(f"capjax {args.command}: error: {msg}", file=sys.stderr)
    _tell_peers(f"{type(e).__name__}: {msg}")
    return 1
  except BaseException as e:
    if peers.current() is not None:
      import traceback
      traceback.print_exc()
      _tell_peers(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise


# The flags and positionals that name files or folders.
PATHS = ("source", "sources", "out", "images", "data_dir", "workdir", "checkpoint", "output",
         "predictions", "references", "hf_dir", "encoder", "decoder")
POSITIONAL = {("prepare", "source"), ("predict", "images"), ("caption", "sources"),
              ("import-hf", "hf_dir"), ("export-hf", "checkpoint")}
# Those that may name a bucket (gs://, s3://): run directories and outputs.
BUCKET_PATHS = {("prepare", "source"), ("prepare", "out"), ("train", "workdir"),
                ("eval", "checkpoint"), ("eval", "out"), ("predict", "checkpoint"),
                ("caption", "checkpoint"),
                ("predict", "output"), ("import-hf", "out"), ("export-hf", "checkpoint"),
                ("export-hf", "out"), ("metrics", "out")}


def _refuse_urls(args) -> None:
  from pipeline import paths

  for dest in PATHS:
    value = getattr(args, dest, None)
    if value is not None:
      positional = (args.command, dest) in POSITIONAL
      paths.refuse_urls(value, dest if positional else "--" + dest.replace("_", "-"),
                        buckets=(args.command, dest) in BUCKET_PATHS)


def _tell_peers(error: str) -> None:
  """In a multi-process run, a failed process tells the others, which stop
  too, and leaves at once: JAX's exit would wait for them at its shutdown
  barrier, which they never reach."""
  watch = peers.current()
  if watch is not None:
    watch.finish(error)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
  sys.exit(main())
