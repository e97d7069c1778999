"""The whole pipeline on synthetic scenes with a local Ray, in minutes on a laptop CPU.

Makes training and test scenes (COCO panoptic format; :mod:`ldmseg.data.roles`), preprocesses the
training scenes with Ray Data (holding out a ``val`` split for the in-training validation),
trains the mask autoencoder and then the latent diffusion model with Ray Train (tracked in a
local sqlite MLflow store), segments the test scenes and prints their PQ/SQ/RQ. Everything lives
under ``--workdir`` (default ``./runs/quickstart``), including ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ldmseg.config import ConfigError
from ldmseg.logs import get_logger

DEFAULT_CONFIG = "quickstart"  # conf/quickstart.yaml (shipped with the package: ldmseg.config_files)
log = get_logger("quickstart")


def write_overlays(gt_dir: Path, pred_dir: Path, out: Path, count: int = 8) -> None:
    """image | ground truth | prediction for the first ``count`` test scenes, as one PNG."""
    from PIL import Image

    from ldmseg.data import coco
    from ldmseg.data.ids import decode_panoptic_png
    from ldmseg.evaluation import prediction_names
    from ldmseg.training.monitor import overlay_panel

    images, gts, preds = [], [], []
    records = coco.load_coco_panoptic(str(gt_dir)).records
    names = prediction_names(records)
    for rec in records[:count]:
        sample = coco.read_sample(rec)
        pred_png = pred_dir / "panoptic" / names[rec.image_id]
        if not pred_png.is_file():
            continue
        images.append(sample.image)
        gts.append(sample.id_map)
        preds.append(decode_panoptic_png(pred_png.read_bytes()))
    if images:
        Image.fromarray(overlay_panel(images, gts, preds)).save(out)


def run_quickstart(workdir: Path, config: str | None, overrides: list[str], *, num_test: int,
                   address: str | None = None) -> dict:
    """Synthesise, preprocess, train both stages, then segment and score the test scenes.

    The three data roles (:mod:`ldmseg.data.roles`): the training scenes (their ``val`` split,
    ``preprocess.val_fraction``, is held out of training and read by the in-training
    validation), and ``num_test`` test scenes of the seed ``synth.seed + TEST_SEED_OFFSET``,
    scored once at the end and used for nothing else.
    """
    from ldmseg.config import load_config
    from ldmseg.data import coco
    from ldmseg.data.roles import role_synth_config, synth_command
    from ldmseg.data.synthetic import write_scenes_from_config
    from ldmseg.evaluation import predict_dataset, progress_logger
    from ldmseg.metrics.pq import evaluate_folders
    from ldmseg.segmenter import Segmenter
    from pipelines import ray_compat
    from pipelines.preprocess import run_preprocess
    from ldmseg.redact import redact_uri
    from pipelines.tracking import resolve_tracking_uri
    from pipelines.train import run_train

    t_all = time.time()
    timings: dict[str, float] = {}
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    if cfg.preprocess.val_fraction <= 0:
        raise ConfigError(f"{config or DEFAULT_CONFIG}: the quickstart needs a val split for its in-training "
                          "validation: set preprocess.val_fraction > 0 (e.g. preprocess.val_fraction=0.0625)")
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, workdir)

    t = time.time()
    log.info("starting Ray" + (f" at {address}" if address else " (local)"))
    ray_compat.init_ray(address, temp_dir=os.environ.get("RAY_TMPDIR"))
    timings["ray_start"] = time.time() - t

    t = time.time()
    train_scenes, test_scenes = workdir / "scenes" / "train", workdir / "scenes" / "test"
    train_synth = role_synth_config(cfg.synth, "train")
    test_synth = role_synth_config(cfg.synth, "test", num_test)
    for synth, out in ((train_synth, train_scenes), (test_synth, test_scenes)):
        log.info(synth_command(synth, str(out)))
        log.info(write_scenes_from_config(out, synth).line())
    timings["synth"] = time.time() - t

    t = time.time()
    log.info(f"preprocessing the training scenes with Ray Data ({cfg.preprocess.val_fraction:.1%} held out as 'val')")
    run_preprocess(cfg, output=str(workdir / "shards"), source=str(train_scenes))
    timings["preprocess"] = time.time() - t

    log.info(f"training the mask autoencoder ({_budget(cfg.train_ae)})")
    ae = run_train("ae", cfg, data=str(workdir / "shards"), run_dir=workdir, tracking_uri=uri)
    timings["train_ae"] = ae.seconds
    log.info(f"training the latent diffusion model ({_budget(cfg.train_ldm)})")
    ldm = run_train("ldm", cfg, data=str(workdir / "shards"), run_dir=workdir, ae_model=ae.model_dir,
                    tracking_uri=uri)
    timings["train_ldm"] = ldm.seconds

    t = time.time()
    k = cfg.sampling.num_samples
    log.info(f"segmenting {num_test} test scenes ({cfg.sampling.sampler}, {cfg.sampling.steps} steps"
             + (f", the {cfg.sampling.fusion} of {k} samples each)" if k > 1 else ")"))
    segmenter = Segmenter.from_pretrained(ldm.model_dir)
    pred_dir = workdir / "predictions"
    stats = predict_dataset(segmenter, coco.load_coco_panoptic(str(test_scenes)), pred_dir,
                            seed=cfg.sampling.seed, batch_size=cfg.sampling.batch_size,
                            progress=progress_logger("evaluate", "segmented"))
    pq = evaluate_folders(str(test_scenes), str(pred_dir), class_agnostic=True)
    timings["evaluate"] = time.time() - t
    overlays = workdir / "overlays.png"
    write_overlays(test_scenes, pred_dir, overlays, count=8)
    timings["total"] = time.time() - t_all

    def stage_summary(res, tcfg, keys):
        m = res.metrics
        return {"steps": m.get("step"), "iterations": tcfg.iterations,
                "stopped_by_time_budget": bool(m.get("stopped_early")),
                "train_seconds": m.get("train_seconds"), "steps_per_s": m.get("train_steps_per_s"),
                "validation": {k: m[k] for k in keys if k in m}}

    safe_uri = redact_uri(uri)
    summary = {
        "test": {"pq": pq["All"]["pq"], "sq": pq["All"]["sq"], "rq": pq["All"]["rq"],
                 "tp": pq["All"]["tp"], "fp": pq["All"]["fp"], "fn": pq["All"]["fn"], "n_images": pq["n_images"],
                 "scenes": synth_command(test_synth, str(test_scenes)), "seed": test_synth.seed},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "model": ldm.model_dir, "ae_model": ae.model_dir, "predictions": str(pred_dir), "overlays": str(overlays),
        "ae": stage_summary(ae, cfg.train_ae, ("val_recon_pq", "val_recon_sq", "val_recon_rq")),
        "ldm": stage_summary(ldm, cfg.train_ldm, ("val_pq", "val_sq", "val_rq")),
        "validation_split": f"{cfg.preprocess.val_fraction:.2%} of the training scenes, held out of training",
        "mlflow_tracking_uri": safe_uri, "mlflow_ui": f"mlflow ui --backend-store-uri {safe_uri}",
        "train_scenes": synth_command(train_synth, str(train_scenes)),
        "sampling": {"sampler": cfg.sampling.sampler, "steps": cfg.sampling.steps,
                     "seconds_per_image": stats["seconds_per_image"]},
        "config": str(config or DEFAULT_CONFIG), "overrides": list(overrides),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _budget(tcfg) -> str:
    cap = f", stopped early after {tcfg.time_budget_s:.0f} s" if tcfg.time_budget_s else ""
    return f"{tcfg.iterations} steps{cap}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/quickstart", help="where everything goes (default: %(default)s)")
    parser.add_argument("--config", default=None, help="YAML config or shipped config name (default: quickstart, i.e. conf/quickstart.yaml)")
    parser.add_argument("--num-test", "--num-eval", dest="num_test", type=int, default=32,
                        help="test scenes to segment and score at the end (default: %(default)s)")
    parser.add_argument("--address", default=None, help="Ray address (default: a local Ray)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train_ldm.iterations=200")


def check_inputs(args: argparse.Namespace) -> None:
    """The config and work folder of ``ldmseg quickstart``, checked before Ray starts."""
    from ldmseg import inputs
    from ldmseg.config import load_config

    inputs.sampling_config(load_config(args.config or DEFAULT_CONFIG, args.overrides).sampling)
    inputs.output_folder("--workdir", args.workdir)


def run(args: argparse.Namespace) -> int:
    check_inputs(args)
    s = run_quickstart(Path(args.workdir), args.config, args.overrides, num_test=args.num_test,
                       address=args.address)
    t, test = s["timings_s"], s["test"]

    def stage_line(name: str) -> str:
        st = s[name]
        early = "  STOPPED BY ITS TIME BUDGET" if st["stopped_by_time_budget"] else ""
        rate = f"{st['steps_per_s']:.2f} steps/s" if st["steps_per_s"] else "rate unknown"
        return f"{name} steps:    {st['steps']}/{st['iterations']} ({rate}){early}"

    print("\n".join([
        "",
        f"LDMSeg quickstart: test class-agnostic PQ {100 * test['pq']:.1f}  SQ {100 * test['sq']:.1f}  "
        f"RQ {100 * test['rq']:.1f}  on {test['n_images']} test scenes of seed {test['seed']} "
        f"(TP {test['tp']}, FP {test['fp']}, FN {test['fn']})",
        stage_line("ae"),
        stage_line("ldm"),
        "timings (s): " + ", ".join(f"{k} {v}" for k, v in t.items()),
        f"model:        {s['model']}",
        f"predictions:  {s['predictions']}",
        f"overlays:     {s['overlays']}  (image | ground truth | prediction; per-step validation panels are "
        "artifacts of the MLflow runs)",
        f"summary:      {Path(args.workdir) / 'summary.json'}",
        f"MLflow UI:    {s['mlflow_ui']}",
        f"test scenes:  {test['scenes']}",
        f"serve it:     ldmseg serve --model {s['model']}   (then open http://127.0.0.1:8000/)",
    ]))
    return 0
