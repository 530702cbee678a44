"""The sequential sources (WebDataset tars, Parquet files) and Hugging Face
folders, on files made here with the real libraries: every record in order,
bad images, missing captions and images, files cut short."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.sources import SourceError, TruncatedInput
from pipeline.sources.parquet import ParquetSource
from pipeline.sources.webdataset import WebDatasetSource

BAD = b"these bytes are not an image"


def _image(color: str, fmt: str = "JPEG") -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (8, 6), color).save(buf, format=fmt)
  return buf.getvalue()


RED, GREEN, BLUE, GREY = (_image(c) for c in ("red", "green", "blue", "grey"))
PNG = _image("yellow", "PNG")


def _read(source) -> tuple[list[dict], dict[str, str]]:
  """Every record of every unit in order, as `prepare` reads them, and the
  truncated files' messages; checks each unit's progress on the way."""
  out, truncated = [], {}
  for unit in source.units():
    unit = pickle.loads(pickle.dumps(unit))  # as a worker process gets it
    last = 0
    try:
      for work_done, record in unit.read():
        assert last <= work_done <= unit.size
        last = work_done
        out.append(record)
    except TruncatedInput as e:
      truncated[unit.name] = str(e)
  return out, truncated


def _summary(records: list[dict]) -> list[tuple]:
  return [(r["id"], r["image"], r["captions"], r.get("error")) for r in records]


def _cut(path, fraction: float = 0.5) -> None:
  """The file cut short, as a download or a copy that stopped."""
  data = open(path, "rb").read()
  open(path, "wb").write(data[:int(len(data) * fraction)])


# WebDataset

def _tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> list[int]:
  """A tar of (key, {extension: data}) samples, members of a sample
  consecutive, as img2dataset's writer makes them; returns each sample's
  start offset, then where the end-of-archive blocks start."""
  starts = []
  with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
    for key, members in samples:
      starts.append(f.tell())
      for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o444
        tar.addfile(info, io.BytesIO(data))
    starts.append(f.tell())
  return starts


def _meta(key: str, caption: str | None = None, **more) -> bytes:
  meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", **more}
  if caption is not None:
    meta["caption"] = caption
  return json.dumps(meta).encode()


def _webdataset(folder) -> list[tuple]:
  """Shards 00000.tar (whole) and 00001.tar (cut in its third sample's image)
  under `folder`; returns the records expected of them, in order."""
  os.makedirs(folder, exist_ok=True)
  _tar(folder / "00000.tar", [
      ("000000000", {"jpg": RED, "txt": b"a red square", "json": _meta("000000000", "a")}),
      ("000000001", {"jpg": BAD, "txt": b"a bad image", "json": _meta("000000001")}),
      ("000000002", {"jpg": BLUE, "json": _meta("000000002")}),  # no caption anywhere
      ("000000003", {"txt": b"no image at all", "json": _meta("000000003")}),
      ("000000004", {"json": _meta("000000004", " from the json "), "png": PNG}),
  ])
  starts = _tar(folder / "00001.tar", [
      ("000000010", {"jpg": GREEN, "txt": b"a green square\n", "json": _meta("000000010")}),
      ("000000011", {"jpeg": GREY, "txt": b"a grey square", "json": _meta("000000011")}),
      ("000000012", {"jpg": RED * 4, "txt": b"cut short", "json": _meta("000000012")}),
  ])
  data = open(folder / "00001.tar", "rb").read()
  open(folder / "00001.tar", "wb").write(data[:starts[2] + 512 + len(RED) * 2])
  return [("000000000", RED, ["a red square"], None),
          ("000000001", BAD, ["a bad image"], None),
          ("000000002", BLUE, [], None),
          ("000000003", b"", ["no image at all"], "no image"),
          ("000000004", PNG, ["from the json"], None),
          ("000000010", GREEN, ["a green square"], None),
          ("000000011", GREY, ["a grey square"], None)]


def test_webdataset_records(tmp_path):
  expected = _webdataset(tmp_path / "wds")
  source = WebDatasetSource(str(tmp_path / "wds" / "{00000..00001}.tar"))
  records, truncated = _read(source)
  assert _summary(records) == expected
  shard = str(tmp_path / "wds" / "00000.tar")
  assert [r["path"] for r in records[:2]] == [f"{shard}:000000000", f"{shard}:000000001"]
  cut = str(tmp_path / "wds" / "00001.tar")
  assert list(truncated) == [cut]
  assert truncated[cut].startswith(f"{cut}: truncated after 2 samples")
  assert "\n" not in truncated[cut]
  units = source.units()
  assert [u.size for u in units] == [os.path.getsize(u.path) for u in units]
  assert not hasattr(source, "__len__") and not hasattr(source, "__getitem__")


def test_webdataset_specs(tmp_path):
  """A brace pattern, a glob, a folder and one file name the same tars."""
  _webdataset(tmp_path / "wds")
  tars = [str(tmp_path / "wds" / f"{n:05d}.tar") for n in range(2)]
  (tmp_path / "wds" / "notes.txt").write_text("not a shard")
  for spec in ("{00000..00001}.tar", "{00000,00001}.tar", "*.tar", "0000?.tar", ""):
    source = WebDatasetSource(os.path.join(str(tmp_path / "wds"), spec))
    assert source.files == tars, spec
    assert [u.path for u in source.units()] == tars
  assert WebDatasetSource(tars[1]).files == tars[1:]
  source = WebDatasetSource(str(tmp_path / "wds" / "*.tar"))
  assert repr(source) == (f"WebDatasetSource({str(tmp_path / 'wds' / '*.tar')!r}, files=2, "
                          "caption_field=None)")
  assert repr(pickle.loads(pickle.dumps(source))) == repr(source)
  with pytest.raises(FileNotFoundError, match="00002.tar"):
    WebDatasetSource(str(tmp_path / "wds" / "{00000..00002}.tar"))
  with pytest.raises(SourceError, match="matches no file"):
    WebDatasetSource(str(tmp_path / "wds" / "x*.tar"))


def test_webdataset_caption_field(tmp_path):
  """`caption_field`: a (nested) field of the .json, a string or a list, over the .txt."""
  _tar(tmp_path / "a.tar", [
      ("k0", {"jpg": RED, "txt": b"ignored", "json": json.dumps(
          {"meta": {"captions": ["one", " two ", ""]}, "alt": "alt 0"}).encode()}),
      ("k1", {"jpg": BLUE, "json": json.dumps({"meta": {"captions": "three"}}).encode()}),
      ("k2", {"jpg": GREEN, "txt": b"no json"}),
      ("k3", {"jpg": GREY, "json": b"{not json"}),
      ("dir.v2/k4", {"jpg": RED, "json": json.dumps({"meta": {}}).encode()}),
  ])
  records, truncated = _read(WebDatasetSource(str(tmp_path / "a.tar"), "meta/captions"))
  assert not truncated
  assert [(r["id"], r["captions"], r.get("error", "")[:14]) for r in records] == [
      ("k0", ["one", "two"], ""), ("k1", ["three"], ""), ("k2", [], ""),
      ("k3", [], "unreadable jso"), ("dir.v2/k4", [], "")]
  records, _ = _read(WebDatasetSource(str(tmp_path / "a.tar"), "alt"))
  assert records[0]["captions"] == ["alt 0"]
  assert "caption_field='alt'" in repr(WebDatasetSource(str(tmp_path / "a.tar"), "alt"))


def test_webdataset_cut_anywhere(tmp_path):
  """Cut at every byte (headers, member data and its padding, the end of
  archive blocks): only TruncatedInput, after exactly the samples whose end
  was read; the sample cut is never yielded."""
  samples = [(f"s{k}", {"jpg": bytes([k]) * (100 + 300 * k), "txt": b"caption %d" % k})
             for k in range(3)]
  path = tmp_path / "whole.tar"
  *starts, last_end = _tar(path, samples)
  whole = open(path, "rb").read()
  expected, _ = _read(WebDatasetSource(str(path)))
  assert [r["id"] for r in expected] == ["s0", "s1", "s2"]
  cut_path = tmp_path / "cut.tar"
  # Every byte near each block boundary (where headers, data and padding
  # start and end), and a stride through the rest.
  cuts = {b + d for b in range(0, last_end + 2 * 512 + 1, 512) for d in range(-3, 4)}
  cuts |= set(range(0, last_end + 2 * 512, 29))
  for cut in sorted(c for c in cuts if 0 <= c <= len(whole)):
    cut_path.write_bytes(whole[:cut])
    records, truncated = _read(WebDatasetSource(str(cut_path)))
    # A sample is known whole once the next one's header is read, the last
    # once (part of) the end-of-archive block is.
    whole_samples = sum(cut >= s + 512 for s in starts[1:]) + (cut > last_end)
    assert _summary(records) == _summary(expected[:whole_samples]), cut
    assert bool(truncated) == (cut <= last_end), cut
    if truncated:
      assert truncated[str(cut_path)].startswith(
          f"{cut_path}: truncated after {whole_samples} samples"), cut


def test_webdataset_progress(tmp_path):
  _tar(tmp_path / "a.tar", [(f"k{i}", {"jpg": RED, "txt": b"c"}) for i in range(40)])
  (unit,) = WebDatasetSource(str(tmp_path / "a.tar")).units()
  done = [w for w, _ in unit.read()]
  # Bytes read, 10 KiB at a time; all of them once the end-of-archive block is.
  assert len(done) == 40 and done == sorted(done) and done[-1] == unit.size
  assert 0 < done[0] < done[20] < unit.size


# Parquet

def _img2dataset_table(keys, images, captions) -> pa.Table:
  n = len(keys)
  return pa.table({
      "key": pa.array(keys, pa.string()), "jpg": pa.array(images, pa.binary()),
      "txt": pa.array(captions, pa.string()),
      "status": ["success" if i is not None else "failed_to_download" for i in images],
      "url": [f"http://example.com/{k}.jpg" for k in keys], "width": pa.array([8] * n),
      "error_message": [None if i is not None else "404" for i in images]})


def _img2dataset_parquet(folder) -> list[tuple]:
  os.makedirs(folder, exist_ok=True)
  pq.write_table(_img2dataset_table(
      ["000000000", "000000001", "000000002", "000000003", "000000004"],
      [RED, BAD, BLUE, None, PNG],
      ["a red square", "a bad image", None, "failed to download", " a png "]),
      folder / "00000.parquet")
  pq.write_table(_img2dataset_table(["000000010", "000000011"], [GREEN, GREY],
                                    ["green", "grey"]), folder / "00001.parquet")
  _cut(folder / "00001.parquet")
  return [("000000000", RED, ["a red square"], None),
          ("000000001", BAD, ["a bad image"], None),
          ("000000002", BLUE, [], None),
          ("000000003", b"", ["failed to download"], "no image"),
          ("000000004", PNG, ["a png"], None)]


HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _hf_parquet(folder) -> list[tuple]:
  """HF's Image feature (a struct of bytes and path), a list of captions, no
  key column; one image only a file beside the Parquet file."""
  os.makedirs(folder / "images", exist_ok=True)
  (folder / "images" / "beside.jpg").write_bytes(GREY)
  images = [{"bytes": RED, "path": "red.jpg"}, {"bytes": BAD, "path": None}, None,
            {"bytes": None, "path": "images/beside.jpg"}, {"bytes": BLUE, "path": None}]
  captions = [["a red square", "red"], ["bad"], ["no image"], ["a file beside"], []]
  table = pa.table({"image": pa.array(images, HF_IMAGE),
                    "captions": pa.array(captions, pa.list_(pa.string()))})
  pq.write_table(table, folder / "train-00000-of-00002.parquet")
  table = pa.table({"image": pa.array([{"bytes": GREEN, "path": None}], HF_IMAGE),
                    "captions": pa.array([["green"]], pa.list_(pa.string()))})
  pq.write_table(table, folder / "train-00001-of-00002.parquet")
  _cut(folder / "train-00001-of-00002.parquet", 0.7)
  return [("train-00000-of-00002/0", RED, ["a red square", "red"], None),
          ("train-00000-of-00002/1", BAD, ["bad"], None),
          ("train-00000-of-00002/2", b"", ["no image"], "no image"),
          ("train-00000-of-00002/3", GREY, ["a file beside"], None),
          ("train-00000-of-00002/4", BLUE, [], None)]


@pytest.mark.parametrize("layout", ["img2dataset", "hf"])
def test_parquet_records(tmp_path, layout):
  folder = tmp_path / layout
  expected = (_img2dataset_parquet if layout == "img2dataset" else _hf_parquet)(folder)
  source = ParquetSource(str(folder))
  records, truncated = _read(source)
  assert _summary(records) == expected
  (cut,) = [str(p) for p in sorted(folder.glob("*.parquet"))[1:]]
  assert truncated == {cut: f"{cut}: not a readable Parquet file (Parquet magic bytes not "
                            "found in footer)"}
  units = source.units()
  assert [u.size for u in units] == [5, 0]
  assert repr(source) == (f"ParquetSource({str(folder)!r}, files=2, image_column=None, "
                          "caption_column=None, id_column=None)")


def test_parquet_specs_and_columns(tmp_path):
  _img2dataset_parquet(tmp_path / "p")
  files = [str(tmp_path / "p" / f"{n:05d}.parquet") for n in range(2)]
  for spec in ("{00000..00001}.parquet", "*.parquet", ""):
    assert ParquetSource(os.path.join(str(tmp_path / "p"), spec)).files == files
  # Named columns: the url as the caption, the status as the id.
  records, _ = _read(ParquetSource(files[0], image_column="jpg", caption_column="url",
                                   id_column="status"))
  assert [(r["id"], r["captions"]) for r in records[:2]] == [
      ("success", ["http://example.com/000000000.jpg"]),
      ("success", ["http://example.com/000000001.jpg"])]
  with pytest.raises(SourceError, match=r"00000.parquet: no caption column 'alt' .*'txt'"):
    ParquetSource(files[0], caption_column="alt")
  with pytest.raises(SourceError, match=r"00000.parquet: no image column 'image' .*'jpg'"):
    ParquetSource(files[0], image_column="image")
  with pytest.raises(SourceError, match=r"00000.parquet: no id column 'id'"):
    ParquetSource(files[0], id_column="id")
  pq.write_table(pa.table({"picture": [RED], "words": ["x"]}), tmp_path / "odd.parquet")
  with pytest.raises(SourceError, match=r"odd.parquet: no image column .*'picture'"):
    ParquetSource(str(tmp_path / "odd.parquet"))
  # Only the cut file: made, cut into a unit, which says why it reads nothing.
  source = ParquetSource(files[1])
  assert [u.size for u in source.units()] == [0]
  assert _read(source) == ([], {files[1]: f"{files[1]}: not a readable Parquet file "
                                          "(Parquet magic bytes not found in footer)"})


def test_parquet_batches(tmp_path):
  """Rows in order across batches and row groups; the work is rows read."""
  n = 150
  table = pa.table({"image": pa.array([b"img %d" % i for i in range(n)], pa.binary()),
                    "caption": [f"caption {i}" for i in range(n)],
                    "other": [b"x" * 100] * n})
  pq.write_table(table, tmp_path / "big.parquet", row_group_size=50)
  (unit,) = ParquetSource(str(tmp_path / "big.parquet")).units()
  assert unit.size == n
  pairs = list(unit.read())
  assert [w for w, _ in pairs] == list(range(1, n + 1))
  assert [r["image"] for _, r in pairs] == [b"img %d" % i for i in range(n)]
  assert [r["id"] for _, r in pairs[:2]] == ["big/0", "big/1"]
  assert pairs[-1][1]["captions"] == [f"caption {n - 1}"]


def test_parquet_damaged_pages(tmp_path):
  """Damage in the middle (the footer whole): the batches before it, then TruncatedInput."""
  n = 200
  table = pa.table({"image": pa.array([bytes([i % 251]) * 40 for i in range(n)], pa.binary()),
                    "caption": [f"caption {i}" for i in range(n)]})
  path = tmp_path / "d.parquet"
  pq.write_table(table, path, row_group_size=100, compression="snappy")
  data = bytearray(path.read_bytes())
  meta = pq.read_metadata(path)
  col = meta.row_group(1).column(0)
  start = col.dictionary_page_offset or col.data_page_offset
  data[start + 20:start + 60] = b"\xff" * 40  # the second row group's image pages
  path.write_bytes(bytes(data))
  records, truncated = _read(ParquetSource(str(path)))
  # Read 64 rows at a time, across row groups: rows 64..127 are one batch.
  assert [r["captions"] for r in records] == [[f"caption {i}"] for i in range(64)]
  assert truncated[str(path)].startswith(f"{path}: damaged after 64 rows (")


# Hugging Face folders (load_dataset's), offline

@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
  """`datasets` with its cache under tmp_path and offline."""
  datasets = pytest.importorskip("datasets")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
  return datasets


def _hf_items(source) -> list[tuple]:
  return [(r["id"], r["image"], r["captions"], r.get("error")) for r in
          (source[i] for i in range(len(source)))]


def test_hf_parquet_folder(tmp_path, hf_cache):
  from pipeline.sources import HFDatasetSource

  datasets = hf_cache
  features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
  ds = datasets.Dataset.from_dict(
      {"image": [{"bytes": RED, "path": None}, {"bytes": BAD, "path": None},
                 {"bytes": BLUE, "path": None}],
       "caption": ["a red square", "a bad image", None]}, features=features)
  os.makedirs(tmp_path / "repo" / "data")
  ds.to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
  source = HFDatasetSource(str(tmp_path / "repo"))
  assert _hf_items(source) == [("0", RED, ["a red square"], None),
                               ("1", BAD, ["a bad image"], None), ("2", BLUE, [], None)]
  again = pickle.loads(pickle.dumps(source))
  assert repr(again) == repr(source) and again[2]["image"] == BLUE
  # The same files, read by ParquetSource.
  records, truncated = _read(ParquetSource(str(tmp_path / "repo" / "data")))
  assert not truncated
  assert [(r["id"], r["image"], r["captions"]) for r in records] == [
      ("train-00000-of-00001/0", RED, ["a red square"]),
      ("train-00000-of-00001/1", BAD, ["a bad image"]),
      ("train-00000-of-00001/2", BLUE, [])]


def test_hf_imagefolder(tmp_path, hf_cache):
  from pipeline.sources import HFDatasetSource

  folder = tmp_path / "imagefolder"
  folder.mkdir()
  rows = [("a.jpg", RED, "a red square"), ("b.jpg", BAD, "a bad image"),
          ("c.png", PNG, None), ("d.jpg", BLUE, "a blue square")]
  for name, data, _ in rows:
    (folder / name).write_bytes(data)
  with open(folder / "metadata.jsonl", "w") as f:
    for name, _, caption in rows:
      f.write(json.dumps({"file_name": name, "caption": caption}) + "\n")
  source = HFDatasetSource(str(folder))
  assert len(source) == 4
  assert _hf_items(source) == [("0", RED, ["a red square"], None),
                               ("1", BAD, ["a bad image"], None), ("2", PNG, [], None),
                               ("3", BLUE, ["a blue square"], None)]
  assert source[1]["path"] == str(folder / "b.jpg")
  with pytest.raises(SourceError, match="no column 'text'"):
    HFDatasetSource(str(folder), caption_column="text")


def test_hf_hub_cache(tmp_path, hf_cache):
  """A Hub repository already in the local cache, by name, offline: its
  Arrow cache is what `load_dataset("me/tiny")` once online would leave
  (here, a local load's, renamed into the repository's place)."""
  import glob
  import shutil

  from pipeline.sources import HFDatasetSource

  datasets = hf_cache
  table = pa.table({"image": pa.array([{"bytes": RED, "path": None},
                                       {"bytes": BAD, "path": None}], HF_IMAGE),
                    "caption": ["a red square", None]})
  pq.write_table(table, tmp_path / "train.parquet")
  datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "train.parquet")})
  cache = datasets.config.HF_DATASETS_CACHE
  (built,) = [p for p in glob.glob(os.path.join(cache, "parquet", "*", "*", "*"))
              if os.path.isdir(p)]
  repo = os.path.join(cache, "me___tiny", "default", "0.0.0", os.path.basename(built))
  shutil.copytree(built, repo)
  for name in os.listdir(repo):
    if name.startswith("parquet-"):
      os.rename(os.path.join(repo, name), os.path.join(repo, "tiny-" + name[len("parquet-"):]))
  source = HFDatasetSource("me/tiny")
  assert _hf_items(source) == [("0", RED, ["a red square"], None), ("1", BAD, [], None)]
  with pytest.raises(SourceError, match="cannot read it offline"):
    HFDatasetSource("me/not-cached")


# End to end: `prepare` on each, then the prepared folder.

def _prepared(source, out) -> tuple[dict, list[tuple[str, list[str]]]]:
  from pipeline import prepare, records

  summary = prepare.prepare(source, str(out), workers=1)
  folder = records.PreparedSource(str(out))
  return summary, [(r["id"], r["captions"]) for r in (folder[i] for i in range(len(folder)))]


def test_prepare_webdataset(tmp_path):
  _webdataset(tmp_path / "wds")
  summary, kept = _prepared(WebDatasetSource(str(tmp_path / "wds")), tmp_path / "out")
  assert kept == [("000000000", ["a red square"]), ("000000004", ["from the json"]),
                  ("000000010", ["a green square"]), ("000000011", ["a grey square"])]
  assert summary["records"] == 4
  assert summary["skipped"] == {"not a readable image": 1, "no captions": 1, "no image": 1}
  cut = str(tmp_path / "wds" / "00001.tar")
  assert list(summary["truncated"]) == [cut]
  assert summary["truncated"][cut].startswith(f"{cut}: truncated after 2 samples")


def test_prepare_img2dataset_parquet(tmp_path):
  _img2dataset_parquet(tmp_path / "p")
  summary, kept = _prepared(ParquetSource(str(tmp_path / "p")), tmp_path / "out")
  assert kept == [("000000000", ["a red square"]), ("000000004", ["a png"])]
  assert summary["records"] == 2
  assert summary["skipped"] == {"not a readable image": 1, "no captions": 1, "no image": 1}
  cut = str(tmp_path / "p" / "00001.parquet")
  assert list(summary["truncated"]) == [cut]
  assert "not a readable Parquet file" in summary["truncated"][cut]


def test_prepare_hf_parquet(tmp_path):
  _hf_parquet(tmp_path / "hf")
  summary, kept = _prepared(ParquetSource(str(tmp_path / "hf")), tmp_path / "out")
  assert kept == [("train-00000-of-00002/0", ["a red square", "red"]),
                  ("train-00000-of-00002/3", ["a file beside"])]
  assert summary["records"] == 2
  assert summary["skipped"] == {"not a readable image": 1, "no captions": 1, "no image": 1}
  cut = str(tmp_path / "hf" / "train-00001-of-00002.parquet")
  assert list(summary["truncated"]) == [cut]
  assert "not a readable Parquet file" in summary["truncated"][cut]


def test_training_names_sequential_sources_as_prepare_input(tmp_path):
  from pipeline import sources
  from tests.tiny_config import get_config

  _webdataset(tmp_path / "wds")
  cfg = get_config()
  cfg.data.train = str(tmp_path / "wds")
  with pytest.raises(SourceError, match=r"data.train: WebDatasetSource\(.*\) is read file by "
                     r"file; run `capjax prepare` on it"):
    sources.open_split(cfg.data, "train")
