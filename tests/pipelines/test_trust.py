"""Small guarantees that keep results trustworthy: one reading of iscrowd, secrets never stored,
MLflow filters that cannot be broken by a name, predictions that never overwrite each other."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers_config import tiny_cfg
from paths import REPO
from ldmseg.checkpoint import build_components, save_model
from ldmseg.redact import redact_uri
from ldmseg.data import coco
from ldmseg.data.slots import clean_segments
from ldmseg.data.ids import encode_panoptic_png, is_crowd

TRUST = ("sampling.steps=1", "sampling.count_th=0.0")


def test_redact_uri_masks_credentials_and_keeps_the_rest():
    assert redact_uri("https://bob:s3cr3t@mlflow.example.com:5000/x?token=abc&exp=1") == \
        "https://***@mlflow.example.com:5000/x?token=***&exp=1"
    assert redact_uri("postgresql://u:p@db/mlflow") == "postgresql://***@db/mlflow"
    for plain in ("sqlite:///runs/a/mlflow.db", "http://127.0.0.1:5000", "databricks", None):
        assert redact_uri(plain) == plain


def test_a_model_folder_never_stores_the_tracking_credentials(tmp_path):
    cfg = tiny_cfg(*TRUST, "tracking.tracking_uri=https://bob:s3cr3t@mlflow.example.com")
    save_model(tmp_path / "m", cfg, build_components(cfg), latent_scale=1.0)
    text = (tmp_path / "m" / "model.json").read_text()
    assert "s3cr3t" not in text and "bob" not in text
    assert json.loads(text)["config"]["tracking"]["tracking_uri"] == "https://***@mlflow.example.com"


@pytest.mark.parametrize("value, crowd", [(0, False), (1, True), (True, True), (False, False), (None, False)])
def test_is_crowd_reads_coco_values(value, crowd):
    assert is_crowd({"id": 1, "iscrowd": value}) is crowd
    assert is_crowd({"id": 1}) is False


def _scene_with_iscrowd(root, iscrowd):
    """A one-image COCO panoptic folder whose second segment carries ``iscrowd``."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "panoptic").mkdir()
    id_map = np.zeros((16, 16), np.int64)
    id_map[:8] = 5
    id_map[8:] = 7
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / "a.jpg")
    (root / "panoptic" / "a.png").write_bytes(encode_panoptic_png(id_map))
    segs = [{"id": 5, "category_id": 1, "iscrowd": 0, "area": 128, "bbox": [0, 0, 16, 8]},
            {"id": 7, "category_id": 1, "iscrowd": iscrowd, "area": 128, "bbox": [0, 8, 16, 8]}]
    (root / "panoptic.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 16, "width": 16}],
        "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": segs}],
        "categories": [{"id": 1, "name": "x", "isthing": 1}]}))
    return id_map, segs


def test_iscrowd_string_is_rejected_by_validation_cleaning_and_pq_alike(tmp_path):
    """``"0"`` used to be a crowd for cleaning (truthy) and not for PQ (``int``): now every reader refuses it."""
    from ldmseg.metrics.pq import PQInputError, evaluate_folders

    id_map, segs = _scene_with_iscrowd(tmp_path / "gt", "0")
    record = coco.load_coco_panoptic(str(tmp_path / "gt")).records[0]
    assert any("iscrowd '0'" in p for p in coco.validate_record(record))
    with pytest.raises(ValueError, match="iscrowd '0'"):
        clean_segments(id_map, segs, min_area=1)
    with pytest.raises(PQInputError, match="iscrowd '0'"):
        evaluate_folders(tmp_path / "gt", tmp_path / "gt", class_agnostic=True)


def test_cleaning_and_pq_agree_on_a_crowd_segment(tmp_path):
    """A crowd segment (iscrowd=1) is void for training and neither matched nor missed by PQ."""
    from ldmseg.metrics.pq import evaluate_folders

    id_map, segs = _scene_with_iscrowd(tmp_path / "gt", 1)
    cleaned = clean_segments(id_map, segs, min_area=1)
    assert cleaned.n_crowd == 1 and set(np.unique(cleaned.id_map)) == {0, 5}
    res = evaluate_folders(tmp_path / "gt", tmp_path / "gt", class_agnostic=True)
    assert (res["All"]["tp"], res["All"]["fn"], res["All"]["fp"]) == (1, 0, 0)


def test_mlflow_run_names_with_quotes_resume_their_run(tmp_path):
    from pipelines.tracking import Tracker, filter_value

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("it's", 'say "hi"'):
        first = Tracker(uri).start("exp", name)
        again = Tracker(uri).start("exp", name)
        assert first is not None and first == again
    with pytest.raises(ValueError, match="both quote"):
        filter_value("it's \"both\"")


def test_predictions_of_inputs_sharing_a_file_name_never_overwrite_each_other(tmp_path):
    """Two inputs in different folders with the same PNG name get two prediction files."""
    from ldmseg.evaluation import predict_dataset, prediction_names
    from ldmseg.segmenter import Segmenter

    for sub in ("x", "y"):
        _scene_with_iscrowd(tmp_path / sub, 0)
    a = coco.load_coco_panoptic(str(tmp_path / "x"))
    b = coco.load_coco_panoptic(str(tmp_path / "y")).records[0]
    b.image_id = 2
    a.records.append(b)
    names = prediction_names(a.records)
    assert len(set(names.values())) == 2 and names[1].endswith("a.png") and names[2].endswith("a.png")

    cfg = tiny_cfg(*TRUST)
    save_model(tmp_path / "model", cfg, build_components(cfg), latent_scale=1.0)
    stats = predict_dataset(Segmenter.from_pretrained(str(tmp_path / "model")), a, tmp_path / "pred")
    written = sorted(p.name for p in (tmp_path / "pred" / "panoptic").glob("*.png"))
    pred_json = json.loads((tmp_path / "pred" / "panoptic.json").read_text())
    assert stats["n_predicted"] == 2 and written == sorted(names.values())
    assert sorted(a["file_name"] for a in pred_json["annotations"]) == written


def test_inpainting_headline_is_the_gain_on_the_unknown_segments():
    """The sweep reports each row's PQ on the mostly-unknown segments against its kind at 0 % known."""
    from pipelines.sweeps.inpainting import add_unknown_gains

    rows = [{"kind": "global", "fraction": 0.0, "pq": 0.40, "pq_unknown": 0.40},
            {"kind": "global", "fraction": 0.5, "pq": 0.70, "pq_unknown": 0.45},
            {"kind": "sparse", "fraction": 0.5, "pq": 0.90, "pq_unknown": 0.60}]
    add_unknown_gains(rows)
    assert rows[0]["gain_unknown"] == 0.0 and rows[1]["gain_unknown"] == pytest.approx(0.05)
    assert rows[2]["gain_unknown"] is None  # no 0 % row of its kind: no gain to claim


def test_every_torch_load_in_the_project_unpickles_weights_only():
    """A checkpoint is data: no ``torch.load`` of the project may run code from a file."""
    import re

    calls = []
    for path in sorted(REPO.glob("*/**/*.py")):
        if path.parts[len(REPO.parts)] in ("ldmseg", "pipelines", "benchmarks", "tests") and path.name != "test_trust.py":
            calls += [(path.name, m.group(0)) for m in re.finditer(r"torch\.load\(.*", path.read_text())]
    assert calls, "no torch.load found: the search is broken"
    assert all("weights_only=True" in call for _, call in calls), calls
