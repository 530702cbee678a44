"""Every caption source, every image mode, every kind of bad file."""

import io
import json
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline import images, prepare, records, sources, transforms
from tests.conftest import run_capjax


def _coco_records(synthetic_coco, split="train"):
  ann = json.load(open(synthetic_coco / "annotations" / f"captions_{split}.json"))
  caps = {}
  for a in ann["annotations"]:
    caps.setdefault(str(a["image_id"]), []).append(a["caption"])
  return ann, caps


def _check(source, expected: dict, paths=True):
  """The source yields exactly `expected` ({id: captions}) with readable
  images, has a stable repr, and pickles (into Grain's workers)."""
  assert len(source) == len(expected)
  seen = {}
  for i in range(len(source)):
    r = source[i]
    assert "error" not in r, r.get("error")
    assert images.decode_image(r["image"]).ndim == 3
    seen[r["id"]] = r["captions"]
  assert seen == expected
  again = pickle.loads(pickle.dumps(source))
  assert repr(again) == repr(source) and again[0]["id"] == source[0]["id"]


def test_coco_and_prepared(synthetic_coco, prepared):
  _, caps = _coco_records(synthetic_coco)
  src = sources.open_source(str(synthetic_coco / "annotations" / "captions_train.json"),
                            images=str(synthetic_coco / "train"))
  _check(src, caps)
  _check(sources.open_source(prepared["train"]), caps)


def test_karpathy_splits(synthetic_coco, tmp_path):
  """dataset_coco.json: images in train2014/ and val2014/ under one root."""
  ann, caps = _coco_records(synthetic_coco)
  root = tmp_path / "coco"
  (root / "train2014").mkdir(parents=True)
  images, expected = [], {"train": {}, "restval": {}, "test": {}}
  for n, im in enumerate(ann["images"][:12]):
    os.link(synthetic_coco / "train" / im["file_name"], root / "train2014" / im["file_name"])
    split = ("train", "restval", "test")[n % 3]
    images.append({"filepath": "train2014", "filename": im["file_name"], "cocoid": im["id"],
                   "split": split, "sentences": [{"raw": c, "tokens": c.split()}
                                                 for c in caps[str(im["id"])]]})
    expected[split][str(im["id"])] = caps[str(im["id"])]
  path = tmp_path / "dataset_coco.json"
  path.write_text(json.dumps({"images": images, "dataset": "coco"}))
  _check(sources.open_source(str(path), images=str(root), split="train+restval"),
         {**expected["train"], **expected["restval"]})
  _check(sources.open_source(str(path), images=str(root), split="test"), expected["test"])
  with pytest.raises(prepare.SourceError, match="unknown split 'dev'"):
    sources.open_source(str(path), images=str(root), split="dev")
  proc = run_capjax("prepare", str(path), "--images", str(root), "--split", "test",
                    "--out", str(tmp_path / "test"))
  assert json.loads(proc.stdout.strip().splitlines()[-1])["records"] == 4


def _tfds_builder():
  import tensorflow_datasets as tfds

  class TinyCocoCaptions(tfds.core.GeneratorBasedBuilder):
    """The feature layout of TFDS's coco_captions."""
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, images=None, **kw):
      self._images = images
      super().__init__(**kw)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "image/filename": tfds.features.Text(),
          "image/id": np.int64,
          "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
      }))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for image_id, (path, caps) in self._images.items():
        yield image_id, {"image": path, "image/filename": os.path.basename(path),
                         "image/id": int(image_id),
                         "captions": {"id": list(range(len(caps))), "text": caps}}

  return TinyCocoCaptions


def test_tfds_data_source(synthetic_coco, tmp_path):
  ann, caps = _coco_records(synthetic_coco)
  chosen = {str(im["id"]): (str(synthetic_coco / "train" / im["file_name"]), caps[str(im["id"])])
            for im in ann["images"][:6]}
  data_dir = tmp_path / "tfds"
  _tfds_builder()(chosen, data_dir=str(data_dir), file_format="array_record"
                  ).download_and_prepare()
  src = sources.open_source("tfds:tiny_coco_captions", split="train", data_dir=str(data_dir))
  _check(src, {k: v for k, (_, v) in chosen.items()})
  proc = run_capjax("prepare", "tfds:tiny_coco_captions", "--data-dir", str(data_dir),
                    "--out", str(tmp_path / "prepared"), "--resize-shorter", "24",
                    "--jpeg-quality", "80")
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["records"] == 6 and summary["captions"] == sum(len(v) for _, v in
                                                                 chosen.values())
  out = records.PreparedSource(str(tmp_path / "prepared"))
  assert min(images.decode_image(out[0]["image"]).shape[:2]) == 24  # was 48
  with pytest.raises(prepare.SourceError, match="no feature"):
    sources.TfdsSource("tiny_coco_captions", "train", str(data_dir), captions_key="text")[0]

  # Training reads the TFDS source as it is, no prepare step.
  from tests.conftest import TINY_CONFIG
  proc = run_capjax("train", "--config", TINY_CONFIG, "--workdir", str(tmp_path / "run"),
                    "--config.data.train=tfds:tiny_coco_captions",
                    "--config.data.eval=tfds:tiny_coco_captions",
                    f"--config.data.source.data_dir={data_dir}",
                    "--config.data.eval_split=train", "--config.train.batch_size=4",
                    "--config.train.steps=2")
  assert "step 2/2" in proc.stdout


def test_hf_datasets_folder(synthetic_coco, tmp_path):
  datasets = pytest.importorskip("datasets")
  ann, caps = _coco_records(synthetic_coco)
  ims = ann["images"][:5]
  ds = datasets.Dataset.from_dict({
      "image": [str(synthetic_coco / "train" / im["file_name"]) for im in ims],
      "caption": [caps[str(im["id"])] for im in ims]}).cast_column("image", datasets.Image())
  datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
  src = sources.open_source(f"hf:{tmp_path / 'hf'}", split="train")
  _check(src, {str(n): caps[str(im["id"])] for n, im in enumerate(ims)})


# Every image mode to RGB, upright.

def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()




@pytest.mark.parametrize("mode, fmt", [
    ("L", "PNG"), ("L", "JPEG"), ("LA", "PNG"), ("P", "PNG"), ("P", "GIF"), ("RGBA", "PNG"),
    ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("I;16", "PNG"), ("RGB", "WEBP"), ("1", "PNG")])
def test_every_mode_to_rgb(mode, fmt):
  rgb = np.zeros((40, 60, 3), np.uint8)
  rgb[:, 30:] = 230  # left black, right light grey
  img = Image.fromarray(rgb)
  if mode == "I;16":
    img = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
    assert img.mode == "I;16"
  else:
    img = img.convert(mode)
  out = images.decode_image(_encode(img, fmt))
  assert out.shape == (40, 60, 3) and out.dtype == np.uint8
  assert out[20, 5].max() < 40 and out[20, 55].min() > 190, (out[20, 5], out[20, 55])


def test_transparency_becomes_white():
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[:, :, 0] = 255  # red, fully transparent on the left half
  rgba[:, 4:, 3] = 255
  out = images.decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
  assert out[4, 1].tolist() == [255, 255, 255] and out[4, 6].tolist() == [255, 0, 0]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation(fmt):
  """A camera's landscape pixels marked 'rotate 90' come out portrait."""
  rgb = np.zeros((40, 80, 3), np.uint8)
  rgb[:, :40] = (250, 0, 0)  # left half red
  exif = Image.Exif()
  exif[274] = 6  # rotate 90 clockwise to display
  out = images.decode_image(_encode(Image.fromarray(rgb), fmt, exif=exif.tobytes()))
  assert out.shape == (80, 40, 3)
  assert out[5, 20, 0] > 200 and out[75, 20, 0] < 60  # red now on top
  plain = _encode(Image.fromarray(rgb), fmt)
  assert images.decode_image(plain).shape == (40, 80, 3)
  if fmt == "JPEG":  # the metadata walk settles plain JPEGs without Pillow
    assert not images._jpeg_may_have_exif(plain)
    assert images._jpeg_may_have_exif(_encode(Image.fromarray(rgb), fmt, exif=exif.tobytes()))


# Bad files: skipped with their reason by prepare, and by the loader's policy.

def _bomb_png(side=20000) -> bytes:
  """A PNG header that claims side x side pixels: Pillow refuses it unopened."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xffffffff)
  ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
          chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


BAD = {
    "truncated.jpg": ("truncated image", lambda good: good[:len(good) // 2]),
    "empty.jpg": ("empty file", lambda good: b""),
    "text.png": ("not a readable image", lambda good: b"hello, not an image"),
    "bomb.png": ("image larger than the decompression-bomb limit", lambda good: _bomb_png()),
}


def _bad_files(folder):
  rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
  good = _encode(Image.fromarray(rgb), "JPEG")
  (folder / "good.jpg").write_bytes(good)
  for name, (_, make) in BAD.items():
    (folder / name).write_bytes(make(good))
  rows = [{"image": n, "caption": f"caption of {n}"} for n in ["good.jpg", *BAD, "missing.jpg"]]
  (folder / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return folder / "t.jsonl"


def test_prepare_skips_bad_files_with_reasons(tmp_path):
  table = _bad_files(tmp_path)
  proc = run_capjax("prepare", str(table), "--out", str(tmp_path / "out"))
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["records"] == 1
  want = {reason: 1 for reason, _ in BAD.values()}
  want["unreadable file (No such file or directory)"] = 1
  assert summary["skipped"] == want
  assert summary["skipped_examples"]["truncated image"] == [str(tmp_path / "truncated.jpg")]
  assert json.load(open(tmp_path / "out" / records.MANIFEST))["skipped"] == want


def test_loader_bad_record_policy(tmp_path):
  from pipeline import tokenizer

  tok_dir = str(tmp_path / "tok")
  tokenizer.train_bpe(["caption of a picture"] * 10, 280, tok_dir)
  src = sources.open_source(str(_bad_files(tmp_path)))
  skip = transforms.TrainBatch(32, tok_dir, 8, 2, bad_records="skip")
  fail = transforms.TrainBatch(32, tok_dir, 8, 2, bad_records="fail")
  out = skip.map(list(enumerate(src[i] for i in range(len(src)))))
  assert out["skipped"].tolist() == [0] + [1] * (len(src) - 1)
  assert out["loss_mask"][0].sum() > 0 and out["loss_mask"][1:].sum() == 0
  assert out["image"].shape == (len(src), 32, 32, 3) and not out["image"][1:].any()
  assert fail.map([(0, src[0])])["skipped"].tolist() == [0]
  with pytest.raises(images.BadImage, match=r"record 'truncated.jpg' .*truncated image"):
    fail.map([(0, src[0]), (1, src[1])])
  with pytest.raises(ValueError, match="data.bad_records"):
    transforms.TrainBatch(32, tok_dir, 8, 2, bad_records="ignore")


def test_random_resized_crop_keeps_the_size_and_varies():
  rgb = np.random.default_rng(1).integers(0, 255, (120, 160, 3)).astype(np.uint8)
  data = _encode(Image.fromarray(rgb), "JPEG")
  rng = np.random.default_rng(0)
  crops = [images.decode_and_resize(data, 32, rng=rng, crop_scale=0.3) for _ in range(4)]
  assert all(c.shape == (32, 32, 3) for c in crops)
  assert len({c.tobytes() for c in crops}) == 4
  plain = images.decode_and_resize(data, 32)
  np.testing.assert_array_equal(plain, images.decode_and_resize(data, 32, rng=rng))
