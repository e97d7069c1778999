"""``ldmseg synth`` and ``ldmseg validate`` through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_coco import entry, image_bytes, image_for, band_id_map, truncated, write_coco_folder

from paths import TINY_YAML
from pipelines.cli import main
from ldmseg.commands import validate as validate_command
from ldmseg.data.synthetic import write_scenes



def _defective_folder(root: Path):
    noisy = image_for(band_id_map(40, 40, list(range(1, 41))))
    return write_coco_folder(root, [
        entry(1),
        entry(2, height=40, width=40, ids=[1, 2], image_data=truncated(image_bytes(noisy), 0.5)),
        entry(3, write_png=False),
        entry(4, in_annotations=False),
    ])


# --------------------------------------------------------------------------------------------
# synth
# --------------------------------------------------------------------------------------------


def test_synth_writes_what_it_says(tmp_path, capsys):
    out = tmp_path / "scenes"
    assert main(["synth", str(out), "--num-images", "3", "--size", "40", "--height", "24", "--seed", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrote 3 images (40x24) with ")
    assert str(out) in lines[0]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"00000000000{i}.jpg" for i in (1, 2, 3)]
    write_scenes(tmp_path / "api", 3, size=40, height=24, seed=5)
    assert (out / "panoptic.json").read_bytes() == (tmp_path / "api" / "panoptic.json").read_bytes()
    assert (out / "panoptic/000000000002.png").read_bytes() == (tmp_path / "api/panoptic/000000000002.png").read_bytes()


def test_synth_knobs_from_config_and_flags(tmp_path, capsys):
    out = tmp_path / "scenes"
    rc = main(["synth", str(out), "--config", str(TINY_YAML), "--num-images", "2",
               "--min-things", "0", "--max-things", "0", "--crowd-prob", "0", "--void-fraction", "0"])
    assert rc == 0
    doc = json.loads((out / "panoptic.json").read_text())
    assert len(doc["images"]) == 2 and doc["images"][0]["width"] == 64  # tiny.yaml: synth.size 64
    things = {c["id"] for c in doc["categories"] if c["isthing"]}
    assert all(s["category_id"] not in things for a in doc["annotations"] for s in a["segments_info"])
    assert "2 images (64x64)" in capsys.readouterr().out


def test_synth_rejects_bad_knobs(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "x"), "--min-things", "5", "--max-things", "1"]) == 2
    assert "min_things <= max_things" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------


def test_validate_clean_folder(tmp_path, capsys):
    write_scenes(tmp_path / "ds", 4, size=32, seed=1)
    assert main(["validate", str(tmp_path / "ds")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [["ok", str(i)] for i in range(1, 5)]
    assert lines[-1].startswith("4 images, 4 ok, 0 with problems, 0 dataset-level problems")


def test_validate_reports_defects_in_text(tmp_path, capsys):
    _defective_folder(tmp_path / "ds")
    assert main(["validate", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split() == ["ok", "1", "000000000001.jpg", "000000000001.png"]
    assert lines[1].split() == ["error", "2", "000000000002.jpg", "000000000002.png"]
    assert "000000000002.jpg cannot be decoded" in lines[2] and "truncated" in lines[2]
    assert lines[3].split()[:2] == ["error", "3"]
    assert "000000000003.png not found" in lines[4]
    assert "image_without_annotation (image 4, 000000000004.jpg): image 000000000004.jpg (id 4) has no annotation" in out
    assert lines[-1].startswith("3 images, 1 ok, 2 with problems, 1 dataset-level problems")


def test_validate_json_output(tmp_path, capsys):
    _defective_folder(tmp_path / "ds")
    assert main(["validate", str(tmp_path / "ds"), "--json", "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"] == {"images": 3, "ok": 1, "with_problems": 2, "dataset_problems": 1}
    assert [(r["image_id"], r["status"], len(r["reasons"])) for r in report["images"]] == [
        (1, "ok", 0), (2, "error", 1), (3, "error", 1)]
    assert report["images"][2]["segments_file"] == "000000000003.png"
    assert report["problems"] == [{"kind": "image_without_annotation", "image_id": 4,
                                   "file_name": "000000000004.jpg",
                                   "reason": "image 000000000004.jpg (id 4) has no annotation"}]


def test_validate_coco_layout_with_explicit_paths(tmp_path, capsys):
    paths = write_coco_folder(tmp_path / "coco", [entry(1), entry(2, image_json={"width": 99})], layout="coco")
    rc = main(["validate", "--images", str(paths.images), "--masks", str(paths.masks),
               "--annotations", str(paths.json_path), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["ok"] == 1
    assert report["images"][1]["reasons"][0] == "image is 16x12 but the JSON says 99x12 (width x height)"


def test_validate_fatal_errors_exit_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing")]) == 2
    assert f"dataset folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    paths = write_coco_folder(tmp_path / "ds", [entry(1)])
    paths.json_path.write_text("not json {")
    assert main(["validate", str(paths.root)]) == 2
    err = capsys.readouterr().err
    assert f"annotation file {paths.json_path} is not valid JSON" in err
    assert main(["validate", "--images", str(paths.images)]) == 2
    assert "all of --images, --masks and --annotations" in capsys.readouterr().err


def test_validate_progress_goes_to_stderr(tmp_path, capsys, monkeypatch):
    write_scenes(tmp_path / "ds", 5, size=16, seed=0)
    monkeypatch.setattr(validate_command, "PROGRESS_EVERY", 2)
    assert main(["validate", str(tmp_path / "ds"), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["[validate] validated 2/5 images (0 with problems)",
                                         "[validate] validated 4/5 images (0 with problems)"]
    assert json.loads(captured.out)["summary"]["ok"] == 5


@pytest.mark.parametrize("folder, count", [("coco-panoptic-sample", 2), ("coco-val-examples", 12)])
def test_validate_real_samples(coco_data, capsys, folder, count):
    assert main(["validate", str(coco_data / folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"] == {"images": count, "ok": count, "with_problems": 0, "dataset_problems": 0}
