"""The `capjax` command: prepare, train, eval, predict, caption, metrics, import-hf,
export-hf.

Configs are Python files (`--config configs/demo.py`, or a name from
`configs/`), overridden with `--config.KEY=VALUE`. Bad input ends the command
with a one-line reason and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from trainer import cli_parser, peers

# TensorFlow is here only for TensorBoard writers: keep its start-up chatter
# (and oneDNN's, which it would not use) off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Grain leaves the batches still prefetched in shared memory at exit for the
# resource tracker (a separate process, hence the environment) to remove; it
# does, but warns about each.
os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:multiprocessing.resource_tracker")


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  rest, overrides = [], []
  for a in argv:
    (overrides if a.startswith("--config.") else rest).append(a)
  return rest, [o[2:] for o in overrides]


def _prepare(args) -> int:
  from pipeline import prepare, sources

  source = sources.open_source(
      args.source, args.images, args.split, args.image_column, args.caption_column,
      args.data_dir, args.image_key, args.captions_key, args.id_key, args.id_column)
  if args.captions:
    source = sources.RecaptionedSource(source, args.captions)
  summary = prepare.prepare(source, args.out, args.num_shards, args.workers,
                            args.resize_shorter, args.jpeg_quality, args.runner,
                            args.beam_options)
  print(json.dumps(summary))
  return 0


def _with_decoding(args, overrides: list[str]) -> list[str]:
  """The decoding flags given, as overrides of the checkpoint's eval section."""
  return [*overrides, *(f"config.eval.{flag}={getattr(args, flag)}"
                        for flag in ("num_beams", "max_length", "no_repeat_ngram_size")
                        if getattr(args, flag) is not None)]


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
                             args.process_index, args.process_count, options,
                             sampling=(args.seed, args.temperature, args.top_p)
                             if args.sample else None, num_return=args.num_return)
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
        f"{cfg.model.encoder.hidden_size}, {_decoder_line(cfg.model.decoder)}, "
        f"images {cfg.data.image_size}px")
  return 0


def _decoder_line(dec) -> str:
  if dec.get("model_type") == "blip_text_model":
    return f"BLIP text {dec.num_hidden_layers} x {dec.hidden_size}"
  return f"GPT-2 {dec.n_layer} x {dec.n_embd}"


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
  args = cli_parser.parser().parse_args(rest)
  if getattr(args, "prompt", None) is not None:
    overrides.append(f"config.model.prompt={args.prompt}")
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
PATHS = ("source", "sources", "captions", "out", "images", "data_dir", "workdir", "checkpoint", "output",
         "predictions", "references", "hf_dir", "encoder", "decoder")
POSITIONAL = {("prepare", "source"), ("predict", "images"), ("caption", "sources"),
              ("import-hf", "hf_dir"), ("export-hf", "checkpoint")}
# Those that may name a bucket (gs://, s3://): run directories and outputs.
BUCKET_PATHS = {("prepare", "source"), ("prepare", "captions"), ("prepare", "out"),
                ("train", "workdir"), ("eval", "checkpoint"), ("eval", "out"), ("predict", "checkpoint"),
                ("caption", "checkpoint"), ("caption", "sources"), ("caption", "out"),
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
