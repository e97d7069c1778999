"""``ldmseg tune WHAT``: the Ray Tune sweeps, one module each in :mod:`pipelines.sweeps`.

- ``sampling``: samplers × steps × other sampling options on a trained model, PQ against
  latency; ``--save-best NAME`` saves the winner as a named sampling config for
  ``ldmseg evaluate --sampling NAME`` (:mod:`pipelines.sweeps.sampling`);
- ``schedules``: short LDM trainings under ASHA over training schedules
  (:mod:`pipelines.sweeps.schedules`);
- ``inpainting``: PQ against the known fraction for sparse and global masks
  (:mod:`pipelines.sweeps.inpainting`).

A failing trial (exception, NaN) is recorded and the sweep goes on; re-running with the same
``--name`` resumes an interrupted sweep. The result is one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# what -> (module, one-line help); each module has add_arguments(parser) and run(args) -> result dict
SWEEPS: dict[str, tuple[str, str]] = {
    "sampling": ("pipelines.sweeps.sampling", "search samplers, step counts and thresholds on a trained model"),
    "schedules": ("pipelines.sweeps.schedules", "short LDM trainings under ASHA over beta schedule, Min-SNR γ, "
                                                "lr schedule and self-conditioning probability"),
    "inpainting": ("pipelines.sweeps.inpainting", "PQ against the known fraction for sparse and global masks "
                                                  "(table and plot)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    for what, (name, help_) in SWEEPS.items():
        module = importlib.import_module(name)
        module.add_arguments(sub.add_parser(what, help=help_, description=(module.__doc__ or help_).strip(),
                                            formatter_class=argparse.RawDescriptionHelpFormatter))


def run(args: argparse.Namespace) -> int:
    res = importlib.import_module(SWEEPS[args.what][0]).run(args)
    summary = {"sweep_id": res["sweep_id"], "best": res.get("best"), "n_trials": len(res["trials"]),
               "n_failed": len(res["failed"]), "output": res["output"]}
    if res.get("saved"):
        summary["saved"] = res["saved"]
    print(json.dumps(summary))
    if res["failed"] and not res["trials"]:  # nothing scored: a sweep that failed, whatever Tune says
        print(f"ldmseg tune {args.what}: every trial failed ({len(res['failed'])}); their errors are in "
              f"{res['output']} and in Tune's error.txt files", file=sys.stderr)
        return 1
    return 0
