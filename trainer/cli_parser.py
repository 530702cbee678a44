"""The `capjax` command line: every subcommand's flags and help (trainer/cli.py
runs them)."""

from __future__ import annotations

import argparse

from trainer import peers

CHECKPOINT_HELP = ("run directory (its latest checkpoint) or one checkpoint step folder; "
                   "local, gs:// or s3://")


class _Parser(argparse.ArgumentParser):
  """Errors as one line: `capjax <command>: error: <reason>`."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
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
  s.add_argument("--captions", metavar="DIR", help="replace each record's captions by the one "
                 "`capjax caption` wrote for it into DIR (by input file and key); records it "
                 "has none for are skipped")
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
  prompt_flag(s)
  distributed_flags(s)

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
  prompt_flag(s)
  distributed_flags(s)

  s = sub.add_parser("predict", help="caption image files, to JSONL",
                     description="Writes one JSON object per image: image, caption, token_ids.")
  s.add_argument("images", nargs="+", help="image files")
  s.add_argument("--checkpoint", required=True,
                 help=CHECKPOINT_HELP)
  s.add_argument("--output", required=True, help="JSONL file to write (local, gs:// or s3://)")
  s.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
  decoding_flags(s)

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
  s.add_argument("--out", required=True, help="output folder: local, gs://BUCKET/PATH or "
                 "s3://BUCKET/PATH")
  s.add_argument("--batch-size", type=int, default=32, help="images per batch, rounded up to "
                 "a multiple of this host's devices (default: 32)")
  decoding_flags(s)
  s.add_argument("--num-return", type=int, default=1, metavar="N", help="N > 1: also the "
                 "columns captions and logprobs, the N best beams (N <= --num-beams) or with "
                 "--sample N draws, best first (default: 1)")
  s.add_argument("--sample", action="store_true", help="draw each caption instead of "
                 "searching for the most likely (--temperature, --top-p), each image's draws "
                 "from --seed and its key: the same captions on every run")
  s.add_argument("--temperature", type=float, default=1.0, help="with --sample (default: 1.0)")
  s.add_argument("--top-p", type=float, default=1.0, help="with --sample: draw from the "
                 "smallest set of tokens holding this much probability (default: 1.0, all)")
  s.add_argument("--seed", type=int, default=0, help="with --sample (default: 0)")
  s.add_argument("--process-index", type=int, help="this host's share: units i with "
                 "i %% count == index (default: SLURM_PROCID, TPU_WORKER_ID, else 0)")
  s.add_argument("--process-count", type=int, help="hosts sharing the units (default: "
                 "SLURM_NTASKS, the TPU VM's workers, else 1; needed in a Kubernetes indexed "
                 "Job, whose JOB_COMPLETION_INDEX is the index)")
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


def prompt_flag(s) -> None:
  s.add_argument("--prompt", help="text every caption continues (config.model.prompt, e.g. "
                 "BLIP's \"a picture of \"): trained without loss on its tokens, forced "
                 "before decoding, left out of the captions")


def decoding_flags(s) -> None:
  prompt_flag(s)
  s.add_argument("--num-beams", type=int, help="beam search width (default: the config's "
                 "eval.num_beams; 1 is greedy)")
  s.add_argument("--max-length", type=int, help="most tokens per caption (default: the "
                 "config's eval.max_length)")
  s.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this "
                 "size (default: the config's eval.no_repeat_ngram_size; 0 is off)")


def distributed_flags(s) -> None:
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
