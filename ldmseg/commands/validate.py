"""Check a COCO panoptic dataset and report every per-image and dataset-level problem.

FOLDER holds images/, panoptic/ and panoptic.json; --images, --masks and --annotations override
those parts (COCO's own layout: --images val2017 --masks annotations/panoptic_val2017
--annotations annotations/panoptic_val2017.json, FOLDER then optional). Paths may be fsspec URLs
(s3://bucket/prefix; endpoint and credentials from the usual AWS_* variables).

Exit status: 0 when the check ran (whatever it found), 2 when the folder or the JSON itself is
missing or unreadable. --json prints one JSON object {"images", "problems", "summary"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor

from ldmseg.logs import get_logger, setup_logging

PROGRESS_EVERY = 500


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", nargs="?", help="COCO panoptic folder (images/, panoptic/, panoptic.json)")
    parser.add_argument("--images", help="folder of the photos (default FOLDER/images)")
    parser.add_argument("--masks", help="folder of the panoptic PNGs (default FOLDER/panoptic)")
    parser.add_argument("--annotations", help="panoptic JSON file (default FOLDER/panoptic.json)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--workers", type=int, default=4, help="threads reading images (default 4)")


def _check_images(coco, workers: int) -> list[dict]:
    from ldmseg.data.coco import validate_record

    def check(record) -> dict:
        reasons = validate_record(record, categories=coco.categories, storage_options=coco.storage_options)
        return {"image_id": record.image_id, "file_name": record.file_name, "segments_file": record.segments_file,
                "status": "error" if reasons else "ok", "reasons": reasons}

    total = len(coco.records)
    results: list[dict] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in pool.map(check, coco.records):
            results.append(result)
            done = len(results)
            if done % PROGRESS_EVERY == 0 and done < total:
                bad = sum(r["status"] != "ok" for r in results)
                get_logger("validate").info("validated %d/%d images (%d with problems)", done, total, bad)
    return results


def _print_table(images: list[dict], problems: list[dict]) -> None:
    for row in images:
        print(f"{row['status']:<5}  {row['image_id']:>12}  {row['file_name']}  {row['segments_file']}")
        for reason in row["reasons"]:
            print(f"{'':>21}- {reason}")
    if problems:
        print("dataset problems:")
        for p in problems:
            where = f" (image {p['image_id']}, {p['file_name']})" if p["image_id"] is not None else ""
            print(f"  {p['kind']}{where}: {p['reason']}")


def run(args: argparse.Namespace) -> int:
    from ldmseg.data.coco import DataError, load_coco_panoptic

    setup_logging()
    if args.folder is None and None in (args.images, args.masks, args.annotations):
        print("ldmseg validate: give a dataset FOLDER, or all of --images, --masks and --annotations",
              file=sys.stderr)
        return 2
    from ldmseg import inputs

    for flag, path in (("FOLDER", args.folder), ("--images", args.images), ("--masks", args.masks),
                       ("--annotations", args.annotations)):
        inputs.s3_credentials(flag, path)
    try:
        coco = load_coco_panoptic(args.folder, images=args.images, masks=args.masks, json_path=args.annotations)
    except DataError as exc:
        print(f"ldmseg validate: {exc.reason}", file=sys.stderr)
        return 2

    images = _check_images(coco, args.workers)
    problems = [p.to_dict() for p in coco.problems]
    ok = sum(row["status"] == "ok" for row in images)
    summary = {"images": len(images), "ok": ok, "with_problems": len(images) - ok,
               "dataset_problems": len(problems)}
    if args.json:
        print(json.dumps({"images": images, "problems": problems, "summary": summary}))
    else:
        _print_table(images, problems)
        print(f"{summary['images']} images, {ok} ok, {summary['with_problems']} with problems, "
              f"{len(problems)} dataset-level problems ({coco.json_path})")
    return 0
