"""PQ evaluator on COCO panoptic folders: the real COCO sample against itself and perturbed copies,
missing predictions, the ``pq`` command line, and reading id maps from PNGs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_pq import check, write_folder
from ldmseg.data.ids import decode_panoptic_png, id_to_rgb
from ldmseg.metrics.pq import evaluate_folders
from ldmseg.metrics.pq_io import PQInputError, read_id_map
from paths import COCO_DATA, REPO

SAMPLE = COCO_DATA / "coco-panoptic-sample"
# the coco_sample fixture fails (does not skip) when the sample is missing from the checkout
needs_sample = pytest.mark.usefixtures("coco_sample")


def sample_images() -> list[tuple[int, np.ndarray, list]]:
    data = json.loads((SAMPLE / "panoptic.json").read_text())
    return [(a["image_id"], read_id_map(SAMPLE / "panoptic" / a["file_name"]).astype(np.int64),
             [dict(s) for s in a["segments_info"]]) for a in data["annotations"]]


def perturbed_sample(tmp_path: Path, change) -> Path:
    """Prediction folder = the sample with ``change(ids, segments_info)`` applied to image 142238."""
    images = []
    for image_id, ids, info in sample_images():
        if image_id == 142238:
            ids, info = change(ids.copy(), info)
        images.append((image_id, ids, info))
    return write_folder(tmp_path / "pred", images)


def sample_checks(result, all_, things, stuff):
    for name, expect in (("All", all_), ("Things", things), ("Stuff", stuff)):
        check(result[name], *expect)


# The sample's non-crowd segments (checked below): image 142238: 13 persons (cat 1), a sports ball
# (37), stuff 184, 187, 193; image 439180: 13 persons, 2 cat 8, 11 cat 19, stuff 125, 184, 187, 193.
# 47 in all; per category TP: 1: 26, 8: 2, 19: 11, 37: 1, 125: 1, 184: 2, 187: 2, 193: 2.
# Things = {1, 8, 19, 37}, Stuff = {125, 184, 187, 193}: n = 8 = 4 + 4.
# Crowds: person 3153362 (142238); person 5120499 and cat-19 16175517 (439180), listed in this order.


@needs_sample
def test_sample_against_itself(tmp_path):
    images = sample_images()
    noncrowd = [sum(1 for s in info if not s["iscrowd"]) for _, _, info in images]
    assert noncrowd == [17, 30]
    result = evaluate_folders(SAMPLE, SAMPLE, workers=1)
    sample_checks(result, (1, 1, 1, 47, 0, 0), (1, 1, 1, 40, 0, 0), (1, 1, 1, 7, 0, 0))
    assert (result["All"]["n"], result["Things"]["n"], result["Stuff"]["n"], result["n_images"]) == (8, 4, 4, 2)

    # class-agnostic: the two crowds of 439180 share one category whose crowd region is 16175517
    # (listed last); the predicted copy of crowd 5120499 lies on neither void nor that region -> FP.
    # TP 47, FP 1: PQ = RQ = 47 / 47.5, SQ = 1
    agnostic = evaluate_folders(SAMPLE, SAMPLE, class_agnostic=True, workers=1)
    check(agnostic["All"], 47 / 47.5, 1, 47 / 47.5, 47, 1, 0)
    assert agnostic["Things"] == agnostic["All"] and agnostic["Stuff"]["n"] == 0

    # a prediction that leaves the crowd regions void (as LDMSeg does) scores 1 class-agnostic
    def crowd_to_void(ids, info):
        for s in [s for s in info if s["iscrowd"]]:
            ids[ids == s["id"]] = 0
            info.remove(s)
        return ids, info

    pred = write_folder(tmp_path / "pred", [(i, *crowd_to_void(m, info)) for i, m, info in images])
    check(evaluate_folders(SAMPLE, pred, class_agnostic=True, workers=1)["All"], 1, 1, 1, 47, 0, 0)


@needs_sample
def test_sample_dropped_person(tmp_path):
    def drop(ids, info):  # person 4917453 (477 px) becomes void
        ids[ids == 4917453] = 0
        return ids, [s for s in info if s["id"] != 4917453]

    result = evaluate_folders(SAMPLE, perturbed_sample(tmp_path, drop), workers=1)
    # person: TP 25, FN 1 -> PQ = RQ = 25/25.5, SQ 1; the 7 other categories 1.
    p = 25 / 25.5
    sample_checks(result, ((7 + p) / 8, 1, (7 + p) / 8, 46, 0, 1), ((3 + p) / 4, 1, (3 + p) / 4, 39, 0, 1),
                  (1, 1, 1, 7, 0, 0))
    # class-agnostic: TP 46, FP 1 (crowd copy, see above), FN 1: PQ = RQ = 46 / 47
    check(evaluate_folders(SAMPLE, tmp_path / "pred", class_agnostic=True, workers=1)["All"],
          46 / 47, 1, 46 / 47, 46, 1, 1)


@needs_sample
def test_sample_merged_stuff(tmp_path):
    def merge(ids, info):  # stuff 187 (11829830, 8204 px) joins stuff 184 (2330219, 130762 px)
        ids[ids == 11829830] = 2330219
        return ids, [s for s in info if s["id"] != 11829830]

    result = evaluate_folders(SAMPLE, perturbed_sample(tmp_path, merge), workers=1)
    # 184: IoU 130762 / (130762 + 8204) = 130762/138966 in 142238 (+1 in 439180): PQ = SQ = (1 + m)/2.
    # 187: FN in 142238, TP in 439180: PQ = RQ = 1/1.5, SQ 1.
    m = 130762 / 138966
    pq184, pq187 = (1 + m) / 2, 1 / 1.5
    sample_checks(result, ((6 + pq184 + pq187) / 8, (7 + pq184) / 8, (7 + pq187) / 8, 46, 0, 1),
                  (1, 1, 1, 40, 0, 0), ((2 + pq184 + pq187) / 4, (3 + pq184) / 4, (3 + pq187) / 4, 6, 0, 1))


@needs_sample
def test_sample_split_stuff(tmp_path):
    def split(ids, info):  # stuff 193 (10025880): its pixels at x >= 480 get the new id 10025881
        part = ids == 10025880
        part[:, :480] = False
        assert (part.sum(), (ids == 10025880).sum()) == (23776, 75100)
        ids[part] = 10025881
        return ids, info + [{"id": 10025881, "category_id": 193, "iscrowd": 0}]

    result = evaluate_folders(SAMPLE, perturbed_sample(tmp_path, split), workers=1)
    # 193: left part 75100 - 23776 = 51324 px, IoU 51324/75100 -> TP; right part -> FP.
    # 193 over both images: TP 2, FP 1, ΣIoU = 1 + s: PQ = (1 + s)/2.5, SQ = (1 + s)/2, RQ = 2/2.5
    s = 51324 / 75100
    pq, sq, rq = (1 + s) / 2.5, (1 + s) / 2, 0.8
    sample_checks(result, ((7 + pq) / 8, (7 + sq) / 8, (7 + rq) / 8, 47, 1, 0), (1, 1, 1, 40, 0, 0),
                  ((3 + pq) / 4, (3 + sq) / 4, (3 + rq) / 4, 7, 1, 0))


@needs_sample
def test_sample_eroded_person(tmp_path):
    def erode(ids, info):  # person 3937500 (3528 px) loses every pixel with a 4-neighbour outside it
        seg = ids == 3937500
        inner = seg.copy()
        inner[1:] &= seg[:-1]
        inner[:-1] &= seg[1:]
        inner[:, 1:] &= seg[:, :-1]
        inner[:, :-1] &= seg[:, 1:]
        assert (seg.sum(), inner.sum()) == (3528, 3138)
        ids[seg & ~inner] = 0
        return ids, info

    result = evaluate_folders(SAMPLE, perturbed_sample(tmp_path, erode), workers=1)
    # person: 26 TPs, one with IoU 3138/3528: PQ = SQ = (25 + e)/26, RQ 1
    p = (25 + 3138 / 3528) / 26
    sample_checks(result, ((7 + p) / 8, (7 + p) / 8, 1, 47, 0, 0), ((3 + p) / 4, (3 + p) / 4, 1, 40, 0, 0),
                  (1, 1, 1, 7, 0, 0))


@needs_sample
def test_sample_shifted_ball(tmp_path):
    def shift(ids, info):  # sports ball 16757838 (175 px) moves 8 px right; its old pixels become void
        ball = ids == 16757838
        moved = np.zeros_like(ball)
        moved[:, 8:] = ball[:, :-8]
        # it lands on 58 of its old pixels, 41 sky (184) and 76 person-crowd (3153362) pixels, no void
        assert (ball.sum(), moved.sum(), (ball & moved).sum()) == (175, 175, 58)
        assert ((ids[moved & ~ball] == 2330219).sum(), (ids[moved & ~ball] == 3153362).sum()) == (41, 76)
        ids[ball] = 0
        ids[moved] = 16757838
        return ids, info

    result = evaluate_folders(SAMPLE, perturbed_sample(tmp_path, shift), workers=1)
    # ball: IoU 58 / (175 + 175 - 58) = 0.199 -> FP + FN, PQ_37 = SQ = RQ = 0.
    # sky 184: pred 130762 - 41 px inside GT: IoU 130721/130762 (+1 in 439180): PQ = SQ = (1 + k)/2.
    # The crowd copy loses 76 px but still lies fully on its crowd -> excused.
    k = (1 + 130721 / 130762) / 2
    sample_checks(result, ((6 + k) / 8, (6 + k) / 8, 7 / 8, 46, 1, 1), (3 / 4, 3 / 4, 3 / 4, 39, 1, 1),
                  ((3 + k) / 4, (3 + k) / 4, 1, 7, 0, 0))
    # class-agnostic: the ball has 76/175 < 0.5 on the (only) crowd of 142238 -> still FP; plus the
    # crowd-copy FP of 439180: TP 46, FP 2, FN 1, ΣIoU = 45 + 130721/130762, denominator 47.5
    iou = 45 + 130721 / 130762
    check(evaluate_folders(SAMPLE, tmp_path / "pred", class_agnostic=True, workers=1)["All"],
          iou / 47.5, iou / 46, 46 / 47.5, 46, 2, 1)


@needs_sample
def test_missing_prediction_is_an_error_or_void(tmp_path):
    images = sample_images()
    pred = write_folder(tmp_path / "pred", images[1:])  # no prediction for 142238
    with pytest.raises(PQInputError, match=r"no prediction for image 142238 .*missing='void'"):
        evaluate_folders(SAMPLE, pred, workers=1)
    # all-void: the 17 non-crowd segments of 142238 are FN; cat 37 and the stuff of 142238 too.
    # per category: 1: TP 13 FN 13 -> 13/19.5 = 2/3; 8, 19, 125: 1; 37: TP 0 FN 1 -> 0;
    # 184, 187, 193: TP 1 FN 1 -> 1/1.5 = 2/3 each. All PQ = RQ = (2/3 + 3 + 0 + 3 * 2/3) / 8 = 17/24;
    # SQ is 1 for every category with a TP and 0 for 37: SQ = 7/8
    result = evaluate_folders(SAMPLE, pred, missing="void", workers=1)
    check(result["All"], 17 / 24, 7 / 8, 17 / 24, 30, 0, 17)
    assert result["n_images"] == 2
    # only the images asked for
    only = evaluate_folders(SAMPLE, pred, image_ids=[439180], workers=1)
    assert only["n_images"] == 1 and only["All"]["pq"] == 1.0


@needs_sample
def test_cli(tmp_path):
    env_python = sys.executable
    images = sample_images()
    pred = write_folder(tmp_path / "pred", images[1:])
    out = subprocess.run([env_python, "-m", "pipelines.cli", "pq", "--gt", str(SAMPLE), "--pred", str(SAMPLE),
                          "--json", "--workers", "1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 47, "fp": 0, "fn": 0, "n": 8}
    assert result["n_images"] == 2 and out.stderr == ""
    out = subprocess.run([env_python, "-m", "pipelines.cli", "pq", "--gt", str(SAMPLE), "--pred", str(SAMPLE),
                          "--json", "--engine", "numpy"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and json.loads(out.stdout) == result

    out = subprocess.run([env_python, "-m", "pipelines.cli", "pq", "--gt", str(SAMPLE), "--pred", str(pred),
                          "--class-agnostic", "--workers", "1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "142238" in out.stderr and "--missing void" in out.stderr
    out = subprocess.run([env_python, "-m", "pipelines.cli", "pq", "--gt", str(SAMPLE), "--pred-json",
                          str(pred / "panoptic.json"), "--pred-masks", str(pred / "panoptic"), "--missing", "void",
                          "--class-agnostic", "--workers", "1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    # 439180 as before (TP 30, FP 1 for the crowd copy), 142238 all-void: FN 17
    assert json.loads(out.stdout)["All"]["fn"] == 17 and "All" in out.stderr  # table on stderr

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "panoptic").mkdir()
    (tmp_path / "bad" / "panoptic.json").write_text("{not json")
    out = subprocess.run([env_python, "-m", "pipelines.cli", "pq", "--gt", str(SAMPLE), "--pred", str(tmp_path / "bad")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "panoptic.json is not readable JSON" in out.stderr
    shutil.rmtree(tmp_path / "pred" / "panoptic")
    out = subprocess.run([env_python, "-m", "pipelines.cli", "pq", "--gt", str(SAMPLE), "--pred", str(pred)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "mask folder" in out.stderr


@needs_sample
def test_read_id_map_matches_decode_panoptic_png(tmp_path):
    for png in sorted((SAMPLE / "panoptic").glob("*.png")):
        ids = read_id_map(png)
        assert ids.dtype == np.uint32
        assert np.array_equal(ids, decode_panoptic_png(png.read_bytes()))
    rgba = np.dstack([id_to_rgb(np.array([[1, 70000], [0, 2**24 - 1]])), np.array([[255, 0], [7, 128]], np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    assert read_id_map(tmp_path / "a.png").tolist() == [[1, 70000], [0, 2**24 - 1]]  # alpha ignored
