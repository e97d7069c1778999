"""Every quality target of the bench (docs/benchmarks.md, "Quality benchmark"), on a finished run.

    python benchmarks/bench_targets.py --workdir runs/bench [--quickstart runs/quickstart]

``--workdir`` is the folder of a finished ``ldmseg quickstart --config conf/bench.yaml`` run; its
test scenes (seed ``synth.seed + 9 000 011``) informed no choice. Printed, as a Markdown table
with each target and whether it holds:

- test PQ of the run (its ``summary.json``, the config's sampling);
- mask AE reconstruction PQ on the real COCO samples in ``tests/data/coco``, the 14 images pooled,
  at the config's own post-processing (its ``sampling`` thresholds);
- inpainting on the test scenes, global masks, 50 % known: the gain of PQ on the mostly-unknown
  segments over 0 % known (:func:`ldmseg.inpainting_eval.inpainting_scores`, known slots
  ``given``);
- the config's sampler at 10 steps against DDIM at 50 steps, test PQ of each;
- with ``--quickstart``: the test PQ of a finished ``ldmseg quickstart`` run (its own config).

Also written to ``WORKDIR/targets.json``. The sampler and every threshold come from the model's
config: nothing here is chosen on the test scenes. ``--samples K`` re-scores a run whose model
predates ``sampling.num_samples`` (or ``sampling.fusion``), as if its config held K: the test PQ and
both sampler figures are then measured here with K samples per image made one map by the config's
``sampling.fusion`` (the test PQ no longer read from the run's ``summary.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

COCO_FOLDERS = ("tests/data/coco/coco-panoptic-sample", "tests/data/coco/coco-val-examples")
TARGETS = {  # name: the least value that meets the target (issue 7/7)
    "test_pq": 70.0,
    "ae_real_coco_pq": 90.0,
    "inpainting_gain": 10.0,
    "ten_step_gap": -1.0,  # PQ(sampler @ 10) - PQ(DDIM @ 50) >= -1
    "quickstart_test_pq": 50.0,
}


def _pct(x: float) -> float:
    return round(100.0 * float(x), 1)


def scores_on_test(model: str, test: str, *, sampler: str | None = None, steps: int | None = None, seed: int = 0,
                num_samples: int | None = None) -> dict:
    """Class-agnostic scores on ``test`` with the config's sampling, ``sampler``/``steps``/``num_samples``
    on top (``ldmseg evaluate``'s computation): the ``All`` row (pq, sq, rq, tp, fp, fn, ...)."""
    from pipelines.evaluate import evaluate

    with tempfile.TemporaryDirectory(prefix="ldmseg-targets-") as tmp:
        res = evaluate(model, test, tmp, sampler=sampler, steps=steps, seed=seed, num_samples=num_samples,
                       log_mlflow=False)
    return {**res["class_agnostic"]["All"], "n_images": res["n_images"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a finished bench run (ldmseg quickstart --config conf/bench.yaml)")
    parser.add_argument("--quickstart", default=None, help="a finished ldmseg quickstart run, for its test PQ")
    parser.add_argument("--samples", type=int, default=None, metavar="K",
                        help="score with K samples per image (sampling.num_samples, made one map by the model's "
                             "sampling.fusion), re-measuring the test PQ: for runs trained before the config held it")
    args = parser.parse_args()
    work = Path(args.workdir)
    summary_path = work / "summary.json"
    if not summary_path.is_file():
        print(f"bench_targets: {summary_path} is missing: give the folder of a finished quickstart run", file=sys.stderr)
        return 2
    summary = json.loads(summary_path.read_text())

    import dataclasses

    from ldmseg.checkpoint import load_model
    from ldmseg.data import coco
    from ldmseg.inpainting_eval import inpainting_scores
    from ldmseg.segmenter import Segmenter
    from ldmseg.training.monitor import ae_reconstruction_pq

    t0 = time.time()
    rows: dict[str, dict] = {}
    test = str(work / "scenes" / "test")
    scores = summary["test"]
    if args.samples:
        scores = {**scores_on_test(summary["model"], test, num_samples=args.samples), "seed": scores["seed"]}
    rows["test_pq"] = {"value": _pct(scores["pq"]),
                       "detail": f"SQ {_pct(scores['sq'])}, RQ {_pct(scores['rq'])}; TP {scores['tp']} / FP "
                                 f"{scores['fp']} / FN {scores['fn']}, {scores['n_images']} scenes of seed "
                                 f"{scores['seed']}" + (f"; {args.samples} samples per image" if args.samples else "")}
    print(f"[targets] test PQ: {rows['test_pq']['value']}", file=sys.stderr)

    loaded = load_model(summary["ae_model"])
    cfg = loaded.cfg
    folders = [coco.load_coco_panoptic(f) for f in COCO_FOLDERS]
    pooled = dataclasses.replace(folders[0], records=[r for d in folders for r in d.records])
    ae = ae_reconstruction_pq(loaded.components["mask_autoencoder"], pooled, cfg)
    rows["ae_real_coco_pq"] = {"value": _pct(ae["pq"]),
                               "detail": f"SQ {_pct(ae['sq'])}, RQ {_pct(ae['rq'])}; {ae['n_images']} images, "
                                         f"{ae['n_segments']} segments, count_th {cfg.sampling.count_th:g}"}
    print(f"[targets] AE on real COCO: {rows['ae_real_coco_pq']['value']}", file=sys.stderr)

    segmenter = Segmenter.from_pretrained(summary["model"])
    dataset = coco.load_coco_panoptic(test)
    inp = {f: inpainting_scores(segmenter, dataset, "global", f) for f in (0.0, 0.5)}
    gain = _pct(inp[0.5]["pq_unknown"]) - _pct(inp[0.0]["pq_unknown"])
    rows["inpainting_gain"] = {"value": round(gain, 1),
                               "detail": f"unknown segments {_pct(inp[0.5]['pq_unknown'])} at 50 % known against "
                                         f"{_pct(inp[0.0]['pq_unknown'])} at 0 %; whole image {_pct(inp[0.5]['pq'])}"}
    print(f"[targets] inpainting gain: {gain:+.1f}", file=sys.stderr)

    sampler, seed = segmenter.cfg.sampling.sampler, segmenter.cfg.sampling.seed
    ten, ddim50 = (_pct(scores_on_test(summary["model"], test, sampler=name, steps=steps, seed=seed,
                                    num_samples=args.samples)["pq"]) for name, steps in ((sampler, 10), ("ddim", 50)))
    rows["ten_step_gap"] = {"value": round(ten - ddim50, 1),
                            "detail": f"{sampler} 10 steps {ten} against DDIM 50 steps {ddim50}"}

    if args.quickstart:
        qs = json.loads((Path(args.quickstart) / "summary.json").read_text())
        rows["quickstart_test_pq"] = {"value": _pct(qs["test"]["pq"]),
                                      "detail": f"{qs['test']['n_images']} scenes of seed {qs['test']['seed']}, "
                                                f"{qs['ldm']['steps']} LDM steps"}

    print("| target | result | needed | met | detail |\n| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        row["target"] = TARGETS[name]
        row["met"] = row["value"] >= TARGETS[name]
        print(f"| {name} | {row['value']} | ≥ {TARGETS[name]:g} | {'yes' if row['met'] else 'no'} | {row['detail']} |")
    (work / "targets.json").write_text(json.dumps({"rows": rows, "seconds": round(time.time() - t0, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
