"""The learning curve of a training run: validation PQ against wall and CPU minutes, from MLflow.

    python benchmarks/learning_curve.py --tracking-uri sqlite:///runs/bench/mlflow.db [--run-name ldm-...]

Reads the ``val_pq`` (LDM stage) or ``val_recon_pq`` (AE stage) history of the newest run of
stage ``--stage`` in the ``ldmseg`` experiment and prints a Markdown table: step, wall minutes
since the run's first metric, CPU minutes (wall × torch threads × workers of that stage), PQ.
"""

from __future__ import annotations

import argparse
import json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", default="ldmseg")
    parser.add_argument("--stage", choices=("ae", "ldm"), default="ldm")
    parser.add_argument("--run-name", default=None, help="default: the newest run of the stage")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from pipelines.tracking import filter_value

    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        raise SystemExit(f"no experiment {args.experiment!r} at {args.tracking_uri}")
    filt = f"tags.`ldmseg.stage` = {filter_value(args.stage)}"
    if args.run_name:
        filt += f" and tags.`mlflow.runName` = {filter_value(args.run_name)}"
    runs = client.search_runs([exp.experiment_id], filter_string=filt, order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        raise SystemExit(f"no {args.stage} run found ({filt})")
    run = runs[0]
    params = run.data.params
    threads = int(params.get(f"train_{args.stage}.torch_threads") or params.get(f"train_{args.stage}.cpus_per_worker") or 1)
    workers = int(params.get(f"train_{args.stage}.num_workers") or 1)
    key = "val_pq" if args.stage == "ldm" else "val_recon_pq"
    first = run.info.start_time  # the stage's start on the driver (Ray Train start-up included)
    rows = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    print(f"run {run.info.run_name} ({run.info.run_id}), {workers} worker(s) x {threads} torch threads\n")
    print(f"| step | wall min | CPU min | {key} |\n|---|---|---|---|")
    for m in rows:
        wall = (m.timestamp - first) / 60000.0
        print(f"| {m.step} | {wall:.1f} | {wall * threads * workers:.1f} | {100 * m.value:.1f} |")
    print(json.dumps({"run": run.info.run_name, "points": [[m.step, m.value] for m in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
