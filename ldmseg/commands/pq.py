"""Panoptic quality of a prediction folder against ground truth, with COCO panoptic semantics.

Both folders use the COCO panoptic layout: panoptic/ (id PNGs) and panoptic.json; --gt-json,
--gt-masks, --pred-json and --pred-masks override those parts (COCO's own layout:
--gt-json annotations/panoptic_val2017.json --gt-masks annotations/panoptic_val2017).

Prints one JSON object on stdout: {"All": {...}, "Things": {...}, "Stuff": {...}, "n_images": N,
"class_agnostic": bool}, each group with pq, sq, rq (fractions in [0, 1], not percent), tp, fp,
fn and n (categories averaged). Without --json a readable table (in percent) also goes to stderr.

Class-aware by default; --class-agnostic gives every segment one category (LDMSeg's setting).
A ground-truth image without a prediction is an error unless --missing void scores it as
all-void. Exit status 2 when an input is missing or malformed. The PNGs are decoded and matched by
hotcoco (Rust) behind the project's checks; --engine numpy uses the project's own NumPy matcher
(same numbers).

Example: ldmseg pq --gt data/val --pred runs/evaluate/predictions --class-agnostic
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", help="ground-truth COCO panoptic folder (panoptic/, panoptic.json)")
    parser.add_argument("--pred", help="prediction folder (panoptic/, panoptic.json)")
    parser.add_argument("--gt-json", help="ground-truth JSON (default GT/panoptic.json)")
    parser.add_argument("--gt-masks", help="ground-truth PNG folder (default GT/panoptic)")
    parser.add_argument("--pred-json", help="prediction JSON (default PRED/panoptic.json)")
    parser.add_argument("--pred-masks", help="prediction PNG folder (default PRED/panoptic)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--class-agnostic", dest="class_agnostic", action="store_true",
                      help="every segment becomes one 'thing' category (crowd flags kept)")
    mode.add_argument("--class-aware", dest="class_agnostic", action="store_false",
                      help="match within the ground truth's categories (default)")
    parser.set_defaults(class_agnostic=False)
    parser.add_argument("--missing", choices=("error", "void"), default="error",
                        help="a ground-truth image without prediction: error (default) or score it as all-void")
    parser.add_argument("--workers", type=int, default=None,
                        help="threads of the hotcoco engine, processes of the numpy one (default: number of CPUs)")
    parser.add_argument("--engine", choices=("hotcoco", "numpy"), default="hotcoco",
                        help="hotcoco (default, fastest) or numpy; the numbers are the same")
    parser.add_argument("--per-image", action="store_true", help="add per-image results under 'per_image'")
    parser.add_argument("--json", action="store_true", help="only the JSON object (no table on stderr)")


def format_table(result: dict) -> str:
    """The groups of an ``evaluate_folders`` result as a small table, PQ/SQ/RQ in percent."""
    mode = "class-agnostic" if result.get("class_agnostic") else "class-aware"
    lines = [f"PQ ({mode}, {result['n_images']} images)",
             f"{'':8}{'PQ':>7}{'SQ':>7}{'RQ':>7}{'TP':>8}{'FP':>8}{'FN':>8}{'N':>6}"]
    for name in ("All", "Things", "Stuff"):
        g = result[name]
        lines.append(f"{name:8}{100 * g['pq']:7.1f}{100 * g['sq']:7.1f}{100 * g['rq']:7.1f}"
                     f"{g['tp']:8d}{g['fp']:8d}{g['fn']:8d}{g['n']:6d}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ldmseg.metrics.pq import evaluate_folders
    from ldmseg.metrics.pq_io import PQInputError

    if args.workers is not None and args.workers < 1:
        print("ldmseg pq: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers is not None:  # hotcoco's Rayon pool reads it when hotcoco first runs in this process
        os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    try:
        result = evaluate_folders(args.gt, args.pred, class_agnostic=args.class_agnostic, missing=args.missing,
                                  workers=args.workers, gt_json=args.gt_json, gt_masks=args.gt_masks,
                                  pred_json=args.pred_json, pred_masks=args.pred_masks, per_image=args.per_image,
                                  engine=args.engine)
    except PQInputError as exc:
        print(f"ldmseg pq: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    if not args.json:
        print(format_table(result), file=sys.stderr)
    return 0
