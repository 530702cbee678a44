"""`capjax metrics`: caption files to COCO caption scores.

Predictions are JSONL as `capjax predict` writes them (`image`, `caption`);
references are a COCO caption annotation file (`images` + `annotations`) or a
JSON object `{image: [captions]}`. A prediction's image is looked up as given,
then by its file name, so `predict`'s paths meet COCO's `file_name`s and
numbers meet image ids. Every image must have exactly one prediction and at
least one reference: a partial match is an error, not a smaller score.
"""

from __future__ import annotations

import json
import os
from typing import Any

from trainer.metrics import caption_metrics


def load_predictions(path: str) -> dict[str, str]:
  """{image: caption} from a JSONL file."""
  out: dict[str, str] = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
      if not isinstance(row, dict) or "image" not in row or not isinstance(row.get("caption"), str):
        raise ValueError(f"{path}:{n}: needs an object with `image` and a string `caption`")
      image = str(row["image"])
      if image in out:
        raise ValueError(f"{path}:{n}: a second prediction for image {image}")
      out[image] = row["caption"]
  if not out:
    raise ValueError(f"{path}: no predictions")
  return out


def load_references(path: str) -> dict[str, list[str]]:
  """{image: [captions]} from COCO annotations or a plain mapping; COCO
  images are keyed by id and by file name."""
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
  if isinstance(data, dict) and "annotations" in data:
    refs: dict[str, list[str]] = {}
    for i, a in enumerate(data["annotations"]):
      if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
        raise ValueError(f"{path}: annotation {i} needs `image_id` and a string `caption`")
      refs.setdefault(str(a["image_id"]), []).append(a["caption"])
    names = {str(im["id"]): im["file_name"] for im in data.get("images", [])
             if isinstance(im, dict) and "id" in im and "file_name" in im}
    return {**refs, **{names[k]: v for k, v in refs.items() if k in names}}
  if isinstance(data, dict) and all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                    for v in data.values()):
    return {str(k): v for k, v in data.items()}
  raise ValueError(f"{path}: expected COCO caption annotations or {{image: [captions]}}")


def match(predictions: dict[str, str], references: dict[str, list[str]],
          pred_path: str, ref_path: str) -> tuple[list[str], list[list[str]], list[str]]:
  """Predictions and their references in prediction order, and the images."""
  images, hyps, refs, used = [], [], [], set()
  for image, caption in predictions.items():
    key = image if image in references else os.path.basename(image)
    if key not in references:
      raise ValueError(f"{ref_path}: no references for image {image} of {pred_path}")
    if not references[key]:
      raise ValueError(f"{ref_path}: image {key} has an empty list of references")
    images.append(image)
    hyps.append(caption)
    refs.append(references[key])
    used.add(id(references[key]))
  missing = [k for k, v in references.items() if id(v) not in used]
  if missing:
    raise ValueError(f"{pred_path}: no prediction for {len({id(references[k]) for k in missing})} "
                     f"image(s) of {ref_path} (first: {missing[0]})")
  return hyps, refs, images


def score_files(pred_path: str, ref_path: str, meteor: bool = True,
                rouge_score: bool = False) -> dict[str, Any]:
  """The scores of a prediction file against a reference file."""
  for path in (pred_path, ref_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file")
  hyps, refs, _ = match(load_predictions(pred_path), load_references(ref_path), pred_path, ref_path)
  out: dict[str, Any] = {"images": len(hyps), **caption_metrics.score(hyps, refs)}
  if meteor:
    if caption_metrics.meteor_available():
      out["meteor"] = caption_metrics.meteor(hyps, refs)
    else:
      out["skipped"] = {"meteor": "needs Java (java on PATH) and pycocoevalcap"}
  if rouge_score:
    out.update(caption_metrics.rouge_score_metrics(hyps, refs))
  return out
