"""ldmseg evaluate and the Ray Tune sweeps, on a tiny model (mask AE trained for seconds, random denoiser)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers_config import EVALUATE, tiny_cfg, tiny_overrides
from paths import TINY_YAML

def gt_segments(folder: str, per_image: bool = False) -> list:
    """The non-crowd segments of a COCO panoptic folder, with their areas counted in its PNGs:
    one list (or, ``per_image``, one list per image) of ``{"id", "area"}``."""
    from ldmseg.metrics.pq_io import read_id_map

    data = json.loads((Path(folder) / "panoptic.json").read_text())
    images = []
    for ann in data["annotations"]:
        ids = read_id_map(Path(folder) / "panoptic" / ann["file_name"])
        images.append([{"id": s["id"], "area": int((ids == s["id"]).sum())}
                       for s in ann["segments_info"] if not s.get("iscrowd", 0)])
    return images if per_image else [s for segs in images for s in segs]


def test_evaluate_writes_predictions_metrics_and_mlflow(tiny_model, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main
    from ldmseg.metrics.pq import evaluate_folders

    model, scenes, _ = tiny_model
    code = main(["evaluate", "--model", model, "--data", scenes, "--steps", "2", "--output", str(tmp_path / "ev")])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n_images"] == 6 and out["steps"] == 2
    assert len(list((tmp_path / "ev" / "predictions" / "panoptic").glob("*.png"))) == 6
    # every ground-truth segment is scored: matched or missed
    counts = out["class_agnostic"]["All"]
    assert counts["tp"] + counts["fn"] == len(gt_segments(scenes)) > 6 and counts["fp"] > 0
    # the reported figures are the evaluator's on the written predictions
    again = evaluate_folders(scenes, str(tmp_path / "ev" / "predictions"), class_agnostic=True)
    assert (again["All"]["tp"], again["All"]["fp"], again["All"]["fn"]) == (counts["tp"], counts["fp"], counts["fn"])
    assert again["All"]["pq"] == pytest.approx(out["pq"]) and again["All"]["sq"] == pytest.approx(out["sq"])
    client = MlflowClient(f"sqlite:///{(tmp_path / 'ev').resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ldmseg-evaluate")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["pq"] == pytest.approx(out["pq"])


def test_evaluate_uses_a_named_sampling_config_under_its_flags(tiny_model, tmp_path, capsys, monkeypatch):
    from ldmseg.sampling_presets import save_preset
    from pipelines.cli import main

    monkeypatch.setenv("LDMSEG_HOME", str(tmp_path / "home"))
    model, scenes, cfg = tiny_model
    save_preset("fast", {"sampler": "euler", "steps": 1, "mask_th": 0.4})
    common = ["evaluate", "--model", model, "--data", scenes, "--max-images", "2", "--no-mlflow"]
    assert main([*common, "--sampling", "fast", "--output", str(tmp_path / "a")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    used = (out["sampler"], out["steps"], out["sampling"]["mask_th"], out["sampling_preset"])
    assert used == ("euler", 1, 0.4, "fast")
    assert out["sampling"]["count_th"] == cfg.sampling.count_th  # the model's own config for the rest
    assert main([*common, "--sampling", "fast", "--steps", "2", "--output", str(tmp_path / "b")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["sampler"], out["steps"]) == ("euler", 2)  # the flags go on top
    # --samples K --fusion medoid scores the medoid of the seeds seed..seed+K-1: each map is one of theirs
    assert main([*common, "--steps", "1", "--samples", "3", "--fusion", "medoid", "--output", str(tmp_path / "k3")]) == 0
    used = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sampling"]
    assert (used["num_samples"], used["fusion"]) == (3, "medoid")
    for seed in range(3):
        assert main([*common, "--steps", "1", "--seed", str(seed), "--output", str(tmp_path / f"s{seed}")]) == 0
    capsys.readouterr()
    pngs = sorted((tmp_path / "k3" / "predictions").rglob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        rel = png.relative_to(tmp_path / "k3")
        assert any(png.read_bytes() == (tmp_path / f"s{seed}" / rel).read_bytes() for seed in range(3)), rel
    # by default the samples are voted (sampling.fusion), one map of the three
    assert main([*common, "--steps", "1", "--samples", "3", "--output", str(tmp_path / "v3")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sampling"]["fusion"] == "vote"
    assert main([*common, "--sampling", "nope", "--output", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldmseg evaluate: no sampling config named 'nope'")
    assert str(tmp_path / "home" / "sampling") in err and "saved: fast" in err


def test_evaluate_on_parquet_shards_scores_a_held_out_split_against_the_source(tiny_model, tmp_path, ray_session):
    """Shards are scored against the source COCO data their manifest records, on the val split by
    default; a training split only when asked; without a readable source, the cleaned ground
    truth, said loudly. No temporary folder is left behind."""
    import shutil

    from ldmseg.config import ConfigError
    from ldmseg.metrics.pq import evaluate_folders
    from pipelines.evaluate import evaluate
    from pipelines.preprocess import run_preprocess

    model, scenes, cfg = tiny_model
    run_preprocess(cfg, output=str(tmp_path / "shards"), source=scenes)  # no val split
    with pytest.raises(ConfigError, match="no 'val' split.*--split train"):
        evaluate(model, str(tmp_path / "shards"), str(tmp_path / "ev0"), sampler="ddim", steps=1, seed=0,
                 log_mlflow=False)
    res = evaluate(model, str(tmp_path / "shards"), str(tmp_path / "ev"), sampler="ddim", steps=1, seed=0,
                   log_mlflow=False, split="train")
    assert res["n_images"] == 6 and "training images, not a held-out result" in res["scored"]
    assert "source" in res["scored"] and "CLEANED" not in res["scored"]
    counts = res["class_agnostic"]["All"]
    assert counts["tp"] + counts["fn"] == len(gt_segments(scenes))  # every non-crowd source segment
    again = evaluate_folders(scenes, res["predictions"], class_agnostic=True)  # full resolution, source GT
    assert (again["All"]["tp"], again["All"]["fp"], again["All"]["fn"]) == (counts["tp"], counts["fp"], counts["fn"])
    assert again["All"]["pq"] == pytest.approx(res["pq"])
    assert not list((tmp_path / "ev").glob("ldmseg-eval-*"))

    val_cfg = tiny_cfg(*EVALUATE, "preprocess.val_fraction=0.5")
    run_preprocess(val_cfg, output=str(tmp_path / "shards_val"), source=scenes)
    moved = tmp_path / "moved"
    res = evaluate(model, str(tmp_path / "shards_val"), str(tmp_path / "ev2"), sampler="ddim", steps=1, seed=0,
                   log_mlflow=False)
    import pyarrow.parquet as pq

    val_ids = {i for f in (tmp_path / "shards_val" / "val").glob("*.parquet")
               for i in pq.read_table(f)["image_id"].to_pylist()}
    assert 0 < res["n_images"] == len(val_ids) < 6 and "held out of training" in res["scored"]
    shutil.copytree(scenes, moved)
    shutil.rmtree(moved / "panoptic")  # the source is no longer readable: cleaned shards GT, said so
    manifest = json.loads((tmp_path / "shards_val" / "_manifest.json").read_text())
    manifest["source_paths"]["source"] = str(moved)
    (tmp_path / "shards_val" / "_manifest.json").write_text(json.dumps(manifest))
    res = evaluate(model, str(tmp_path / "shards_val"), str(tmp_path / "ev3"), sampler="ddim", steps=1, seed=0,
                   log_mlflow=False)
    assert res["n_images"] == len(val_ids) and "CLEANED ground truth at the training resolution" in res["scored"]


def test_sampling_sweep_records_trials_summary_and_survives_a_failing_trial(tiny_model, tmp_path, ray_session,
                                                                            monkeypatch):
    from mlflow.tracking import MlflowClient

    from ldmseg.sampling_presets import load_preset
    from pipelines.sweeps.sampling import run_sampling_sweep

    monkeypatch.setenv("LDMSEG_HOME", str(tmp_path / "home"))
    model, scenes, _ = tiny_model
    # steps=0 is invalid: those two trials raise, the other four must still run
    res = run_sampling_sweep(model, scenes, str(tmp_path / "sweep"), samplers=["ddim", "euler"], steps=[0, 1, 2],
                             max_concurrent=2, name="sweep-test", save_best="best")
    assert len(res["trials"]) == 4 and len(res["failed"]) == 2
    assert {t["steps"] for t in res["trials"]} == {1, 2} and {f["steps"] for f in res["failed"]} == {0}
    assert (tmp_path / "sweep" / "pareto.png").stat().st_size > 1000
    best_path = tmp_path / "home" / "sampling" / "best.yaml"
    assert res["saved"] == str(best_path)
    best = load_preset("best")
    assert best == {"sampler": res["best"]["sampler"], "steps": res["best"]["steps"]}
    assert res["best"]["pq"] == max(t["pq"] for t in res["trials"])

    client = MlflowClient(f"sqlite:///{(tmp_path / 'sweep').resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ldmseg-tune")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`ldmseg.sweep` = 'sweep-test'")
    kinds = sorted(r.data.tags["ldmseg.kind"] for r in runs)
    assert kinds == ["sampling-summary"] + ["sampling-trial"] * 6
    statuses = sorted(r.info.status for r in runs if r.data.tags["ldmseg.kind"] == "sampling-trial")
    assert statuses == ["FAILED"] * 2 + ["FINISHED"] * 4
    summary = next(r for r in runs if r.data.tags["ldmseg.kind"] == "sampling-summary")
    assert "pareto.png" in {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert yaml.safe_load(best_path.read_text().split("\n", 1)[1])["sampling"]["sampler"] in ("ddim", "euler")


def test_inpainting_sweep_writes_table_plot_and_runs(tiny_model, tmp_path, ray_session):
    from mlflow.tracking import MlflowClient

    from pipelines.sweeps.inpainting import run_inpainting_sweep

    model, scenes, _ = tiny_model
    res = run_inpainting_sweep(model, scenes, str(tmp_path / "inp"), kinds=["sparse", "global"], fractions=[0.0, 0.5],
                               steps=1, max_images=3, name="inp-test", known_slots="predicted")
    assert not res["failed"] and len(res["trials"]) == 4
    by = {(t["kind"], t["fraction"]): t for t in res["trials"]}
    assert by["global", 0.0]["known_fraction"] == 0.0 and by["global", 0.5]["known_fraction"] == pytest.approx(0.5)
    assert by["global", 0.5]["pq"] > by["global", 0.0]["pq"]  # half of the map is given
    assert (tmp_path / "inp" / "inpainting.png").stat().st_size > 1000
    assert "| global | 0.5 |" in (tmp_path / "inp" / "table.md").read_text()
    client = MlflowClient(f"sqlite:///{(tmp_path / 'inp').resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ldmseg-tune").experiment_id],
                              filter_string="tags.`ldmseg.sweep` = 'inp-test'")
    kinds = sorted(r.data.tags["ldmseg.kind"] for r in runs)
    assert kinds == ["inpainting-summary"] + ["inpainting-trial"] * 4
    assert {r.data.params["known_slots"] for r in runs} == {"predicted"}


def test_schedule_sweep_under_asha_reports_validation_pq(tiny_model, tmp_path, ray_session):
    from mlflow.tracking import MlflowClient

    from pipelines.preprocess import run_preprocess
    from pipelines.sweeps.schedules import SPACE, run_schedule_sweep

    model, scenes, cfg = tiny_model
    run_preprocess(cfg, output=str(tmp_path / "shards"), source=scenes)
    res = run_schedule_sweep(str(tmp_path / "shards"), model, str(tmp_path / "sched"), config=str(TINY_YAML),
                             overrides=tiny_overrides(*EVALUATE, "train_ldm.batch_size=4", "train_ldm.warmup=1"), num_samples=4,
                             max_steps=4, eval_every=2, val_images=3, val_steps=1, name="sched-test")
    assert not res["failed"] and len(res["trials"]) == 4
    assert all(set(SPACE) <= set(t) and t["steps"] in (2, 4) for t in res["trials"])
    assert max(t["steps"] for t in res["trials"]) == 4  # ASHA let the best go to the end
    # PQ = SQ · RQ in every row (the three figures belong together)
    assert all(t["val_pq"] == pytest.approx(t["val_sq"] * t["val_rq"], abs=1e-12) for t in res["trials"])
    client = MlflowClient(f"sqlite:///{(tmp_path / 'sched').resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ldmseg-tune").experiment_id],
                              filter_string="tags.`ldmseg.kind` = 'schedule-trial'")
    assert len(runs) == 4
    histories = [client.get_metric_history(r.info.run_id, "val_pq") for r in runs]
    assert all([m.step for m in h] in ([2], [2, 4]) for h in histories)
    # each trial logged the false positives of its 3 validation images: a whole number per batch
    fps = [client.get_metric_history(r.info.run_id, "val_fp_per_image") for r in runs]
    for fp, h in zip(fps, histories):
        assert [m.step for m in fp] == [m.step for m in h]
        assert all(3 * m.value == pytest.approx(round(3 * m.value), abs=1e-9) for m in fp), fp
    assert any(m.value > 0 for fp in fps for m in fp)  # the trained AE decodes segments: there are some
    # each row holds its trial's last validation (the step ASHA stopped it at), as the trial logged it
    last = sorted((h[-1].step, h[-1].value) for h in histories)
    assert [s for s, _ in last] == sorted(t["steps"] for t in res["trials"])
    assert [v for _, v in last] == pytest.approx(
        [t["val_pq"] for t in sorted(res["trials"], key=lambda t: (t["steps"], t["val_pq"]))], abs=1e-12)


def test_tune_sampling_searches_samples_per_image_apart_from_its_trial_count(tiny_model, tmp_path):
    import argparse

    from pipelines.sweeps.sampling import add_arguments, check_inputs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    model, scenes, _ = tiny_model
    args = parser.parse_args(["--model", model, "--data", scenes, "--output", str(tmp_path / "o"), "--steps", "2",
                              "--samples", "1,4", "--num-samples", "3", "--mask-th", "0.4"])
    assert args.num_samples == 3  # Ray Tune's trial count, not a sampling field
    samplers, steps, extra = check_inputs(args)
    assert steps == [2] and extra == {"num_samples": [1, 4], "mask_th": [0.4]}
