"""ldmseg segment's argument checks (before Ray starts) and its plan: names, ids, what is done."""

from __future__ import annotations

import json

import pytest

from helpers_cli import fails, good, no_ray  # noqa: F401 - fixtures
from pipelines.segment_plan import Namer, done_names, list_images, name_images, plan, stable_id


@pytest.fixture
def photos(tmp_path):
    """A folder of empty-named files (listing never opens them) and a list file."""
    root = tmp_path / "photos"
    for rel in ("a/1.jpg", "a/2.PNG", "b/1.jpg", "c/x.jpg", "c/x.png", "d/000000000139.jpeg", "d/notes.txt",
                "e/deep/y.TIFF", "f g/with space.webp"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    return root


@pytest.mark.parametrize("case, names", [
    ("uncertainty", ["--uncertainty", "1", "--uncertainty 1"]),
    ("input", ["--input", "missing-folder"]),
    ("sampler", ["--sampler", "nope", "--sampler nope"]),
    ("steps", ["--steps", "0", "--steps 0"]),
    ("model", ["--model"]),
    ("override", ["segment.nope"]),
    ("foreign override", ["train_ae.lr"]),
    ("bad value", ["segment.max_actors"]),
])
def test_bad_arguments_fail_in_one_line_before_ray(case, names, good, no_ray, tmp_path, photos, capsys):
    argv = ["segment", "--model", good["model"], "--input", str(photos), "--output", str(tmp_path / "out")]
    if case == "uncertainty":
        argv += ["--uncertainty", "1"]
    elif case == "input":
        argv[argv.index("--input") + 1] = str(tmp_path / "missing-folder")
    elif case == "sampler":
        argv += ["--sampler", "nope"]
    elif case == "steps":
        argv += ["--steps", "0"]
    elif case == "model":
        argv[argv.index("--model") + 1] = str(tmp_path)
    elif case == "override":
        argv += ["segment.nope=1"]
    elif case == "foreign override":
        argv += ["train_ae.lr=1"]
    else:
        argv += ["segment.max_actors=0"]
    fails(argv, capsys, names[-1] if case != "input" else "missing-folder")


def test_listing_names_and_ids(photos):
    uris, root = list_images(str(photos))
    assert len(uris) == 8 and root == str(photos)  # notes.txt left out; suffixes in any case
    namer, refs = name_images(uris, root)
    names = {r.name: r.image_id for r in refs}
    # the same file name in two folders keeps apart; same stem in one folder keeps its suffix
    assert set(names) == {"a/1", "a/2", "b/1", "c/x_jpg", "c/x_png", "d/000000000139", "e/deep/y",
                          "f g/with space"}
    assert names["d/000000000139"] == 139  # a unique digit stem is the COCO id
    assert names["a/1"] == stable_id("a/1") != names["b/1"]  # "1" twice: hashed
    assert names["a/2"] == 2 and all(0 <= i < 2 ** 53 for i in names.values())
    # a Ray task names a path the same way as the driver did
    assert namer.ref(str(photos / "c" / "x.png")) == next(r for r in refs if r.name == "c/x_png")


def test_list_file_input(tmp_path, photos):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two photos\n{photos / 'a/1.jpg'}\n\n{photos / 'e/deep/y.TIFF'}\n")
    uris, root = list_images(str(listing))
    assert uris == sorted([str(photos / "a/1.jpg"), str(photos / "e/deep/y.TIFF")]) and root == str(photos)
    assert [r.name for r in name_images(uris, root)[1]] == ["a/1", "e/deep/y"]
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("s3://bucket/a.jpg\n/local/b.jpg\n")
    with pytest.raises(ValueError, match="mixes filesystems"):
        list_images(str(mixed))


def test_done_records_and_overwrite(tmp_path, photos):
    out = tmp_path / "out"
    (out / "panoptic.parts").mkdir(parents=True)
    (out / "errors").mkdir()
    (out / "panoptic.parts" / "p1.json").write_text(json.dumps(
        {"images": [], "annotations": [{"image_id": 1, "file_name": "a/1.png", "segments_info": []}]}))
    (out / "panoptic.parts" / "p2.json").write_text('{"images": [], "annotat')  # killed while writing
    (out / "errors" / "p3.jsonl").write_text(json.dumps({"name": "c/x_png", "reason": "empty"}) + "\n{half")
    assert done_names(str(out)) == ({"a/1"}, {"c/x_png"})
    work = plan(str(photos), str(out))
    assert (len(work.found), len(work.todo), work.done_segmented, work.done_quarantined) == (8, 6, 1, 1)
    again = plan(str(photos), str(out), overwrite=True)
    assert len(again.todo) == 8 and not (out / "panoptic.parts").exists() and not (out / "errors").exists()


def test_namer_is_small_to_ship(photos):
    uris, root = list_images(str(photos))
    namer = Namer(uris * 1, root)
    assert namer.clashing_stems == {"c/x"} and namer.repeated_leaves == {"1"}
