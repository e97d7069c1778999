"""Mask AE reconstruction PQ on COCO panoptic folders (e.g. the real samples of shared/data).

    python benchmarks/ae_recon.py --model runs/bench/models/ae --data ../shared/data/coco-panoptic-sample \
        --data ../shared/data/coco-val-examples

Each folder's masks are resized to the model's training resolution and reconstructed by the AE
(:func:`ldmseg.validation.ae_reconstruction_pq`); one line of PQ/SQ/RQ per folder and overall.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder holding a mask_autoencoder")
    parser.add_argument("--data", action="append", required=True, help="COCO panoptic folder (repeatable)")
    parser.add_argument("--max-images", type=int, default=None)
    args = parser.parse_args()

    from ldmseg.checkpoint import load_model
    from ldmseg.data import coco
    from ldmseg.validation import ae_reconstruction_pq

    loaded = load_model(args.model)
    ae = loaded.components["mask_autoencoder"]
    cfg = loaded.cfg
    print(f"model {args.model}: resolution {cfg.data.resolution}, {cfg.data.num_slots} slots")
    for folder in args.data:
        r = ae_reconstruction_pq(ae, coco.load_coco_panoptic(folder), cfg, max_images=args.max_images)
        print(f"{folder}: PQ {100 * r['pq']:.1f}  SQ {100 * r['sq']:.1f}  RQ {100 * r['rq']:.1f}  "
              f"({r['n_images']} images, {r['n_segments']} segments, {r['n_over_slots']} beyond the slots)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
