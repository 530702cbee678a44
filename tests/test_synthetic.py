import collections
import json

import numpy as np

from pipeline import synthetic


def test_generate_is_deterministic_and_coco_shaped(tmp_path):
  a = synthetic.generate(str(tmp_path / "a"), num_train=12, num_val=4, side=32, seed=3, processes=1)
  b = synthetic.generate(str(tmp_path / "b"), num_train=12, num_val=4, side=32, seed=3, processes=2)
  assert a == b == {"train": {"images": 12, "captions": 60}, "val": {"images": 4, "captions": 20}}
  for split in ("train", "val"):
    ja = json.loads((tmp_path / "a" / "annotations" / f"captions_{split}.json").read_text())
    jb = json.loads((tmp_path / "b" / "annotations" / f"captions_{split}.json").read_text())
    assert ja == jb
    for image in ja["images"]:
      assert (tmp_path / "a" / split / image["file_name"]).read_bytes() == \
          (tmp_path / "b" / split / image["file_name"]).read_bytes()
  train = json.loads((tmp_path / "a" / "annotations" / "captions_train.json").read_text())
  val = json.loads((tmp_path / "a" / "annotations" / "captions_val.json").read_text())
  assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}
  assert len({a["id"] for a in train["annotations"] + val["annotations"]}) == 80


def test_every_reference_parses_back_to_the_scene():
  rng = np.random.default_rng(0)
  counts = collections.Counter()
  for _ in range(300):
    shapes, background = synthetic.sample_scene(rng)
    counts[len(shapes)] += 1
    caps = synthetic.captions_for(shapes, background)
    assert len(set(caps)) >= 5
    truth = collections.Counter((s.size, s.colour, s.kind) for s in shapes)
    for c in caps:
      parsed = synthetic.parse_caption(c)
      assert parsed.objects == truth, c
      assert parsed.count in (None, len(shapes)), c
    assert [s.x for s in shapes] == sorted(s.x for s in shapes)
  assert set(counts) == {1, 2, 3}


def test_content_accuracy_checks_every_detail():
  refs = ["a small red circle and a large blue square",
          "two shapes : a small red circle and a large blue square on a plain background"]
  right = "a small red circle to the left of a large blue square"
  assert synthetic.caption_is_right(right, refs)
  assert synthetic.caption_is_right("two shapes : a large blue square and a small red circle", refs)
  wrong = [
      "a small red circle",  # a shape missing
      "a small green circle and a large blue square",  # wrong colour
      "a large red circle and a large blue square",  # wrong size
      "a small red cross and a large blue square",  # wrong kind
      "three shapes : a small red circle and a large blue square",  # wrong count
      "a small red circle , a large blue square and a small red circle",  # extra shape
      "",
  ]
  for w in wrong:
    assert not synthetic.caption_is_right(w, refs), w
  assert synthetic.content_accuracy([right, wrong[0]], [refs, refs]) == 0.5


def test_the_held_out_palette_uses_only_new_colours(tmp_path):
  synthetic.generate(str(tmp_path / "new"), num_train=24, num_val=4, side=32, seed=1,
                     processes=1, palette="held-out")
  data = json.loads((tmp_path / "new" / "annotations" / "captions_train.json").read_text())
  colours = collections.Counter()
  for a in data["annotations"]:
    for size, colour, kind in synthetic.parse_caption(a["caption"]).objects:
      colours[colour] += 1
  assert set(colours) == set(synthetic.HELD_OUT_COLOURS)
  assert not set(synthetic.HELD_OUT_COLOURS) & set(synthetic.COLOURS)
  refs = ["a small pink circle and a large cyan square"]
  assert synthetic.caption_is_right("a small pink circle to the left of a large cyan square", refs)
  assert not synthetic.caption_is_right("a small red circle and a large cyan square", refs)
