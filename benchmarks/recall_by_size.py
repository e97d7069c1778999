"""Which ground-truth segments a prediction misses: recall by thing/stuff and by area.

A ground-truth segment (crowd regions excluded) counts as found when it is a class-agnostic PQ
true positive (:func:`ldmseg.metrics.pq.match_segments`: IoU > 0.5 with a predicted segment);
its area is the one PQ uses. One line per group: segments, found, recall.

    python benchmarks/recall_by_size.py --gt runs/bench2/scenes/eval --pred runs/bench2/predictions
"""

from __future__ import annotations

import argparse
from collections import Counter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt", required=True, help="ground-truth COCO panoptic folder")
    parser.add_argument("--pred", required=True, help="prediction folder (e.g. ldmseg evaluate's predictions/)")
    parser.add_argument("--bins", default="64,256", help="area bin edges in pixels (default 64,256)")
    args = parser.parse_args()

    from ldmseg.metrics.pq import match_segments
    from ldmseg.metrics.pq_io import load_panoptic_set, read_id_map

    gt = load_panoptic_set(args.gt)
    pred = load_panoptic_set(args.pred, role="prediction")
    edges = [int(e) for e in args.bins.split(",")]
    total, found = Counter(), Counter()
    for image_id, ann in gt.annotations.items():
        if image_id not in pred.annotations:
            raise SystemExit(f"{args.pred}: no prediction for image {image_id} ({ann['file_name']})")
        m = match_segments(read_id_map(gt.mask_path(image_id)), ann["segments_info"],
                           read_id_map(pred.mask_path(image_id)), pred.annotations[image_id]["segments_info"],
                           class_agnostic=True, image_id=image_id)
        for seg, area, crowd, hit in zip(ann["segments_info"], m.gt_area, m.gt.crowd, m.match.any(axis=1)):
            if crowd:
                continue
            kind = "thing" if gt.categories.get(seg["category_id"], {}).get("isthing", 1) else "stuff"
            bin_ = sum(area >= e for e in edges)
            low, high = ([0] + edges)[bin_], (edges + [None])[bin_]
            size = f"{low}-{high - 1} px" if high is not None else f">= {low} px"
            for group in (kind, f"{kind} {size}"):
                total[group] += 1
                found[group] += bool(hit)
    print(f"{len(gt.annotations)} images; a segment is found at IoU > 0.5")
    for group in sorted(total):
        print(f"{group:<20} {total[group]:>5} segments  {found[group]:>5} found  recall {found[group] / total[group]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
