"""Training-sample throughput: Parquet shards vs decoding COCO per sample, and preprocess cost.

Measured in one run on the same images at the coco config's 512x512 training resolution:
  1. on the fly (the official approach): read JPEG + panoptic PNG, decode ids, clean, remap,
     resize/pad, per sample;
  2. our Parquet reader (ShardDataset, training mode: random slot re-permutation included);
  3. preprocessing images/s with Ray Data (Ray overhead included, per CPU) vs a bare
     decode + resize loop over the same files in one process.

    OMP_NUM_THREADS=1 python benchmarks/loader_speed.py [--source FOLDER] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def on_the_fly(records, cfg, rng) -> None:
    from ldmseg.data import coco, encoding

    for rec in records:
        s = coco.read_sample(rec)
        clean = encoding.clean_segments(s.id_map, s.segments_info, cfg.data.min_segment_area)
        remap = encoding.remap_ids(clean.id_map, cfg.data.num_slots, rng)
        image, slots, valid, _ = encoding.resize_pad(s.image, remap.slot_map, cfg.data.resolution)
        encoding.image_to_tensor(image)


def bare_decode_resize(records, resolution) -> None:
    from PIL import Image

    from ldmseg.data.ids import rgb_to_id

    for rec in records:
        with Image.open(rec.image_path) as im:
            im = im.convert("RGB")
            scale = resolution / max(im.size)
            size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
            im.resize(size, Image.BILINEAR)
        with Image.open(rec.panoptic_path) as pm:
            ids = rgb_to_id(np.asarray(pm.convert("RGB")))
            Image.fromarray(ids.astype(np.int32), mode="I").resize(size, Image.NEAREST)


def replicate(source: Path, out: Path, copies: int) -> Path:
    """A COCO panoptic folder with ``copies`` of every image (new ids, symlinked files)."""
    import json

    data = json.loads((source / "panoptic.json").read_text())
    (out / "images").mkdir(parents=True)
    (out / "panoptic").mkdir()
    images, anns = [], []
    for c in range(copies):
        for img, ann in zip(data["images"], data["annotations"]):
            new_id = c * 10**9 + img["id"]
            fn, pn = f"{new_id}.jpg", f"{new_id}.png"
            (out / "images" / fn).symlink_to((source / "images" / img["file_name"]).resolve())
            (out / "panoptic" / pn).symlink_to((source / "panoptic" / ann["file_name"]).resolve())
            images.append({**img, "id": new_id, "file_name": fn})
            anns.append({**ann, "image_id": new_id, "file_name": pn})
    (out / "panoptic.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                   "categories": data["categories"]}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "coco-val-examples"))
    ap.add_argument("--repeat", type=int, default=10, help="passes over the images for the reader timings")
    ap.add_argument("--copies", type=int, default=20, help="copies of each image for the preprocess timing")
    args = ap.parse_args()

    from ldmseg.config import load_config
    from ldmseg.data import coco
    from ldmseg.data.parquet_dataset import ShardDataset
    from pipelines import ray_compat
    from pipelines.preprocess import run_preprocess

    cfg = load_config(REPO / "conf/coco.yaml", ["preprocess.rows_per_file=64"])
    records = coco.load_coco_panoptic(args.source).records
    n = len(records)
    print(f"{n} images from {args.source}, training resolution {cfg.data.resolution}, "
          f"{args.repeat} passes, torch threads {os.environ.get('OMP_NUM_THREADS')}")

    rng = np.random.default_rng(0)
    on_the_fly(records[:2], cfg, rng)  # warm-up
    t = time.perf_counter()
    for _ in range(args.repeat):
        on_the_fly(records, cfg, rng)
    fly = n * args.repeat / (time.perf_counter() - t)

    t = time.perf_counter()
    for _ in range(args.repeat):
        bare_decode_resize(records, cfg.data.resolution)
    bare = n * args.repeat / (time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as tmp:
        ray_compat.init_ray(num_cpus=os.cpu_count())
        out = Path(tmp) / "shards"
        big = replicate(Path(args.source), Path(tmp) / "big", args.copies)
        run_preprocess(cfg, output=str(out / "warmup"), source=args.source)  # starts Ray's workers
        t = time.perf_counter()
        run_preprocess(cfg, output=str(out / "timed"), source=str(big))
        prep_s = time.perf_counter() - t
        prep = n * args.copies / prep_s
        run_preprocess(cfg, output=str(out / "timed_small"), source=args.source)
        ds = ShardDataset(str(out / "timed_small"), "train", cfg.data.num_slots, train=True, repeat=True, seed=0)
        it = iter(ds)
        next(it)
        t = time.perf_counter()
        for _ in range(n * args.repeat):
            next(it)
        parquet = n * args.repeat / (time.perf_counter() - t)

    cpus = os.cpu_count() or 1
    print(f"on the fly (COCO JSON+PNG+JPG, remap, resize) : {fly:8.1f} samples/s")
    print(f"Parquet reader (decode + re-permute)          : {parquet:8.1f} samples/s")
    print(f"  ratio reader / on the fly                   : {parquet / fly:8.1f}x   (target >= 10x)")
    print(f"bare decode + resize loop, 1 process          : {bare:8.1f} images/s")
    print(f"preprocess with Ray Data, {cpus} CPUs           : {prep:8.1f} images/s "
          f"({n * args.copies} images in {prep_s:.1f} s)")
    print(f"  ratio preprocess per CPU / bare loop        : {prep / cpus / bare:8.2f}x  (target >= 0.7x)")


if __name__ == "__main__":
    main()
