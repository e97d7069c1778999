"""How to make one map of K samples: the medoid sample or a segment-wise vote, PQ against K.

Draws K samples (seeds 0..K-1, the model's sampling config, one per call as
``ldmseg evaluate --samples K`` draws them) of every image of a COCO panoptic folder once, keeps
them in ``--cache`` (an .npz; a second run with the same cache samples nothing), then scores,
for each K of ``--ks`` (the first K seeds), the medoid (:func:`ldmseg.agreement.choose_medoid`,
what ``sampling.num_samples`` ships) and the vote (:func:`ldmseg.agreement.consensus_map`),
class-agnostic PQ as ``ldmseg evaluate`` reports it. One line per rule and K.

    python benchmarks/sample_fusion.py --model runs/b7/models/ldm --data runs/val/scenes \\
        --cache runs/fusion/b7.npz --ks 1,3,5,8,16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def sample_all(model: str, data: str, k: int, cache: Path, max_images: int | None = None):
    """{image_id: (K, H, W) int16} of every image, from ``cache`` when it holds K samples of them."""
    import numpy as np

    from ldmseg.data import coco
    from ldmseg.segmenter import Segmenter

    records = coco.load_coco_panoptic(data).records[:max_images]
    if cache.is_file():
        held = dict(np.load(cache))
        if all(str(r.image_id) in held and held[str(r.image_id)].shape[0] >= k for r in records):
            return {r.image_id: held[str(r.image_id)][:k] for r in records}, records
    segmenter = Segmenter.from_pretrained(model)
    images = [coco.read_sample(r).image for r in records]
    maps = {r.image_id: [] for r in records}
    t0 = time.time()
    for seed in range(k):
        for start in range(0, len(images), 16):
            part = records[start:start + 16]
            results = segmenter.segment(images[start:start + 16], seed=seed, num_samples=1)
            for r, res in zip(part, results):
                maps[r.image_id].append(res.id_map.astype(np.int16))
        print(f"seed {seed + 1}/{k} sampled ({time.time() - t0:.0f} s)", flush=True)
    stacked = {i: np.stack(m) for i, m in maps.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **{str(i): m for i, m in stacked.items()})
    return stacked, records


def score(records, id_maps: dict, data: str) -> dict:
    """Class-agnostic PQ of ``id_maps`` ({image_id: (H, W) ids}) against ``data``."""
    from ldmseg.data.coco_writer import CocoPanopticWriter
    from ldmseg.data.segments import segments_info
    from ldmseg.evaluation import prediction_names
    from ldmseg.metrics.pq import evaluate_folders

    with tempfile.TemporaryDirectory() as tmp:
        writer = CocoPanopticWriter(tmp, [{"id": 1, "name": "object", "isthing": 1, "supercategory": "object"}])
        names = prediction_names(records)
        for r in records:
            writer.add_image(r.image_id, r.file_name, r.height, r.width)
            writer.add_annotation(r.image_id, names[r.image_id], id_maps[r.image_id], segments_info(id_maps[r.image_id]))
        writer.close()
        return evaluate_folders(gt=data, pred=tmp, class_agnostic=True,
                                image_ids=[r.image_id for r in records])["All"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (ldmseg train's models/ldm)")
    parser.add_argument("--data", required=True, help="COCO panoptic folder (a validation set: this chooses)")
    parser.add_argument("--cache", required=True, help=".npz of the drawn samples (made when missing)")
    parser.add_argument("--ks", default="1,3,5,8,16", help="comma list of K (default 1,3,5,8,16)")
    parser.add_argument("--min-support", type=float, default=None, help="the vote keeps segment groups of more "
                        "than this fraction of the samples (default: the shipped VOTE_MIN_SUPPORT, 0.2)")
    parser.add_argument("--max-images", type=int, help="the first N images only (default: all)")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    from ldmseg.agreement import VOTE_MIN_SUPPORT, choose_medoid, consensus_map

    min_support = VOTE_MIN_SUPPORT if args.min_support is None else args.min_support

    samples, records = sample_all(args.model, args.data, max(ks), Path(args.cache), args.max_images)
    for k in ks:
        medoid = {i: m[choose_medoid(list(m[:k]))[0]].astype("int64") for i, m in samples.items()}
        vote = {i: consensus_map(list(m[:k]), min_support)[0] for i, m in samples.items()}
        for rule, maps in (("medoid", medoid), ("vote", vote)):
            s = score(records, maps, args.data)
            print(json.dumps({"K": k, "rule": rule, "pq": round(100 * s["pq"], 1), "sq": round(100 * s["sq"], 1),
                              "rq": round(100 * s["rq"], 1), "tp": s["tp"], "fp": s["fp"], "fn": s["fn"]}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
