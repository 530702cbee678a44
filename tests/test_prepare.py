import io
import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline import images, prepare, records, sources, transforms
from tests.conftest import run_capjax


def _jpeg(path, size=(40, 30), colour=(200, 20, 20)):
  Image.new("RGB", size, colour).save(path, format="JPEG")


def test_coco_prepare_keeps_every_image_and_caption(synthetic_coco, prepared):
  src = records.PreparedSource(prepared["train"])
  ann = json.loads((synthetic_coco / "annotations" / "captions_train.json").read_text())
  assert len(src) == len(ann["images"]) == 96
  assert src.manifest["captions"] == len(ann["annotations"])
  assert src.manifest["shards"] == 3 and src.manifest["skipped"] == {}
  by_id = {}
  for a in ann["annotations"]:
    by_id.setdefault(str(a["image_id"]), []).append(a["caption"])
  seen = [src[i] for i in range(len(src))]
  assert [r["id"] for r in seen] == [str(i["id"]) for i in ann["images"]]
  for r in seen:
    assert r["captions"] == by_id[r["id"]]
  first = ann["images"][0]["file_name"]
  assert seen[0]["image"] == (synthetic_coco / "train" / first).read_bytes()
  assert repr(src) == repr(records.PreparedSource(prepared["train"]))


def test_tables_group_captions_and_skip_bad_images(tmp_path):
  img_dir = tmp_path / "imgs"
  img_dir.mkdir()
  _jpeg(img_dir / "a.jpg")
  _jpeg(img_dir / "b.jpg", colour=(0, 0, 255))
  (img_dir / "empty.jpg").write_bytes(b"")
  (img_dir / "text.jpg").write_text("not an image")
  rows = [("imgs/a.jpg", "a red picture"), ("imgs/a.jpg", "red all over"),
          ("imgs/b.jpg", "a blue picture"), ("imgs/missing.jpg", "gone"),
          ("imgs/empty.jpg", "nothing"), ("imgs/text.jpg", "words")]
  csv_path = tmp_path / "data.csv"
  csv_path.write_text("file,text\n" + "".join(f"{i},{c}\n" for i, c in rows))
  jsonl_path = tmp_path / "data.jsonl"
  jsonl_path.write_text("".join(json.dumps({"file": i, "text": [c]}) + "\n" for i, c in rows))
  for table in (csv_path, jsonl_path):
    out = tmp_path / ("out_" + table.suffix[1:])
    proc = run_capjax("prepare", str(table), "--out", str(out), "--image-column", "file",
                      "--caption-column", "text")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["records"] == 2 and summary["captions"] == 3
    assert summary["skipped"] == {"unreadable file (No such file or directory)": 1,
                                  "empty file": 1, "not a readable image": 1}
    src = records.PreparedSource(str(out))
    assert sorted(tuple(src[i]["captions"]) for i in range(2)) == [
        ("a blue picture",), ("a red picture", "red all over")]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out_")]


def test_bad_table_names_the_column(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps({"image": "x.jpg"}) + "\n")
  with pytest.raises(prepare.SourceError, match=r"t.jsonl: record 1 has no column 'caption'"):
    sources.open_source(str(path))
  proc = run_capjax("prepare", str(path), "--out", str(tmp_path / "o"), check=False)
  assert proc.returncode != 0
  assert proc.stderr.strip().count("\n") == 0 and "no column 'caption'" in proc.stderr
  assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("mode", ["crop", "squash"])
def test_decode_and_resize(fmt, mode):
  img = np.zeros((60, 90, 3), np.uint8)
  img[:, :45] = (255, 0, 0)  # left half red, right half blue
  img[:, 45:] = (0, 0, 255)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format=fmt)
  out = images.decode_and_resize(buf.getvalue(), 24, mode)
  assert out.shape == (24, 24, 3) and out.dtype == np.uint8
  assert out[12, 2, 0] > 200 and out[12, 2, 2] < 60  # still red on the left
  assert out[12, 21, 2] > 200 and out[12, 21, 0] < 60  # still blue on the right
  into = np.zeros((2, 24, 24, 3), np.uint8)
  assert np.shares_memory(images.decode_and_resize(buf.getvalue(), 24, mode, out=into[1]),
                          into)
  np.testing.assert_array_equal(into[1], out)
  assert not into[0].any()


def test_auto_resample_stays_close_to_area_averaging():
  """Bilinear below 2x (what DCT-scaled JPEGs need) instead of area averaging."""
  rng = np.random.default_rng(0)
  smooth = cv2.resize(rng.uniform(0, 255, (9, 12, 3)).astype(np.float32), (320, 240),
                      interpolation=cv2.INTER_CUBIC)
  img = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
  for size in (224, 150, 100, 70):  # shrinking by 1.4x, 2.1x, 3.2x, 4.6x
    area = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(float)
    auto = images._resize(img, size, "auto").astype(float)
    assert np.abs(auto - area).mean() < 2.0, size


def test_tokenize_layout(tmp_path):
  from pipeline import tokenizer

  tok = tokenizer.train_bpe(["a red circle", "a blue square"] * 20, 300, str(tmp_path / "tok"))
  bos, eos, pad = tokenizer.special_ids(tok)
  out = transforms.tokenize_captions(tok, ["a red circle", "a blue square and a red circle"], 6)
  ids = tok("a red circle", add_special_tokens=False)["input_ids"]
  n = len(ids)
  assert out["input_ids"][0, :n + 1].tolist() == [bos] + ids
  assert out["labels"][0, :n + 1].tolist() == ids + [eos]
  assert out["loss_mask"][0].tolist() == [1.0] * (n + 1) + [0.0] * (6 - n - 1)
  assert out["loss_mask"][1].tolist() == [1.0] * 6  # truncated: no EOS fits
  # The Rust tokenizer used directly gives what the wrapper gives.
  odd = ["  Two  spaces, a tab\tand ÜNICODE — «quotes»", "ends with a space ", "x" * 50, ""]
  for caption in odd:
    ids = tok(caption, add_special_tokens=False)["input_ids"]
    assert transforms.tokenize_captions(tok, [caption], 64)["labels"][0, :len(ids)].tolist() == ids
