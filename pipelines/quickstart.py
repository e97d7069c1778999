"""The whole pipeline on synthetic scenes with a local Ray, in minutes on a laptop CPU.

Makes training and held-out scenes (COCO panoptic format), preprocesses them with Ray Data,
trains the mask autoencoder and then the latent diffusion model with Ray Train (tracked in a
local sqlite MLflow store), segments the held-out scenes and prints PQ/SQ/RQ. Everything lives
under ``--workdir`` (default ``./runs/quickstart``), including ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "quickstart.yaml"


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def synth_args(cfg, out: Path, seed: int, num_images: int) -> list[str]:
    """The ``ldmseg synth`` command-line words that make these scenes."""
    s = cfg.synth
    return ["ldmseg", "synth", str(out), "--num-images", str(num_images), "--size", str(s.size),
            "--seed", str(seed), "--min-things", str(s.min_things), "--max-things", str(s.max_things),
            "--max-stuff", str(s.max_stuff), "--void-fraction", str(s.void_fraction), "--crowd-prob", str(s.crowd_prob),
            "--shared-colour-prob", str(s.shared_colour_prob)]


def write_overlays(gt_dir: Path, pred_dir: Path, out: Path, count: int = 8) -> None:
    """image | ground truth | prediction for the first ``count`` held-out scenes, as one PNG."""
    from PIL import Image

    from ldmseg.data import coco
    from ldmseg.data.ids import decode_panoptic_png
    from ldmseg.validation import overlay_panel

    images, gts, preds = [], [], []
    for rec in coco.load_coco_panoptic(str(gt_dir)).records[:count]:
        sample = coco.read_sample(rec)
        pred_png = pred_dir / "panoptic" / Path(rec.segments_file).with_suffix(".png").name
        if not pred_png.is_file():
            continue
        images.append(sample.image)
        gts.append(sample.id_map)
        preds.append(decode_panoptic_png(pred_png.read_bytes()))
    if images:
        Image.fromarray(overlay_panel(images, gts, preds)).save(out)


def run_quickstart(workdir: Path, config: str | None, overrides: list[str], *, num_eval: int,
                   address: str | None = None) -> dict:
    import ldmseg.cli
    from ldmseg.config import load_config
    from ldmseg.data import coco
    from ldmseg.evaluation import predict_dataset
    from ldmseg.metrics.pq import evaluate_folders
    from ldmseg.segmenter import Segmenter
    from pipelines import ray_compat
    from pipelines.preprocess import run_preprocess
    from pipelines.tracking import resolve_tracking_uri
    from pipelines.train import run_train

    t_all = time.time()
    timings: dict[str, float] = {}
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, workdir)

    t = time.time()
    _say("starting Ray" + (f" at {address}" if address else " (local)"))
    ray_compat.init_ray(address, temp_dir=os.environ.get("RAY_TMPDIR"))
    timings["ray_start"] = time.time() - t

    t = time.time()
    train_scenes, eval_scenes = workdir / "scenes" / "train", workdir / "scenes" / "eval"
    train_words = synth_args(cfg, train_scenes, cfg.synth.seed, cfg.synth.num_images)
    eval_words = synth_args(cfg, eval_scenes, cfg.synth.seed + 1_000_003, num_eval)
    for words in (train_words, eval_words):
        _say(" ".join(words))
        ldmseg.cli.main(words[1:])
    timings["synth"] = time.time() - t

    t = time.time()
    _say("preprocessing the training scenes with Ray Data")
    run_preprocess(cfg, output=str(workdir / "shards"), source=str(train_scenes))
    timings["preprocess"] = time.time() - t

    _say(f"training the mask autoencoder ({cfg.train_ae.iterations} steps)")
    ae = run_train("ae", cfg, data=str(workdir / "shards"), run_dir=workdir, tracking_uri=uri)
    timings["train_ae"] = ae.seconds
    _say(f"training the latent diffusion model ({cfg.train_ldm.iterations} steps"
         + (f", at most {cfg.train_ldm.time_budget_s:.0f} s" if cfg.train_ldm.time_budget_s else "") + ")")
    ldm = run_train("ldm", cfg, data=str(workdir / "shards"), run_dir=workdir, ae_model=ae.model_dir,
                    tracking_uri=uri)
    timings["train_ldm"] = ldm.seconds

    t = time.time()
    _say(f"segmenting {num_eval} held-out scenes ({cfg.sampling.sampler}, {cfg.sampling.steps} steps)")
    segmenter = Segmenter.from_pretrained(ldm.model_dir)
    pred_dir = workdir / "predictions"
    stats = predict_dataset(segmenter, coco.load_coco_panoptic(str(eval_scenes)), pred_dir,
                            seed=cfg.sampling.seed, batch_size=cfg.sampling.batch_size)
    pq = evaluate_folders(str(eval_scenes), str(pred_dir), class_agnostic=True)
    timings["evaluate"] = time.time() - t
    overlays = workdir / "overlays.png"
    write_overlays(eval_scenes, pred_dir, overlays, count=8)
    timings["total"] = time.time() - t_all

    summary = {
        "pq": pq["All"]["pq"], "sq": pq["All"]["sq"], "rq": pq["All"]["rq"],
        "tp": pq["All"]["tp"], "fp": pq["All"]["fp"], "fn": pq["All"]["fn"], "n_images": pq["n_images"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "model": ldm.model_dir, "ae_model": ae.model_dir, "predictions": str(pred_dir), "overlays": str(overlays),
        "validation": {k: ldm.metrics[k] for k in ("val_pq", "val_sq", "val_rq") if k in ldm.metrics},
        "ae_validation": {k: ae.metrics[k] for k in ("val_recon_pq", "val_recon_sq", "val_recon_rq")
                          if k in ae.metrics},
        "ldm_steps": ldm.metrics.get("step"), "ae_steps": ae.metrics.get("step"),
        "mlflow_tracking_uri": uri, "mlflow_ui": f"mlflow ui --backend-store-uri {uri}",
        "eval_scenes": eval_words[1:], "train_scenes": train_words[1:],
        "sampling": {"sampler": cfg.sampling.sampler, "steps": cfg.sampling.steps,
                     "seconds_per_image": stats["seconds_per_image"]},
        "config": str(config or DEFAULT_CONFIG),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/quickstart", help="where everything goes (default: %(default)s)")
    parser.add_argument("--config", default=None, help="YAML config (default: conf/quickstart.yaml)")
    parser.add_argument("--num-eval", type=int, default=32, help="held-out scenes to evaluate (default: %(default)s)")
    parser.add_argument("--address", default=None, help="Ray address (default: a local Ray)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train_ldm.iterations=200")


def run(args: argparse.Namespace) -> int:
    s = run_quickstart(Path(args.workdir), args.config, args.overrides, num_eval=args.num_eval,
                       address=args.address)
    t = s["timings_s"]
    print("\n".join([
        "",
        f"LDMSeg quickstart: held-out class-agnostic PQ {100 * s['pq']:.1f}  SQ {100 * s['sq']:.1f}  "
        f"RQ {100 * s['rq']:.1f}  on {s['n_images']} scenes (TP {s['tp']}, FP {s['fp']}, FN {s['fn']})",
        "timings (s): " + ", ".join(f"{k} {v}" for k, v in t.items()),
        f"model:        {s['model']}",
        f"predictions:  {s['predictions']}",
        f"overlays:     {s['overlays']}  (image | ground truth | prediction; per-step validation panels are "
        "artifacts of the MLflow runs)",
        f"summary:      {Path(args.workdir) / 'summary.json'}",
        f"MLflow UI:    {s['mlflow_ui']}",
        "more held-out scenes of this kind:  " + " ".join(s["eval_scenes"]).replace("synth ", "ldmseg synth ", 1),
    ]))
    return 0
