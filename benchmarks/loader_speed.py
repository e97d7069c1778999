"""Training-sample throughput: Parquet shards vs decoding COCO per sample, and preprocess cost.

Measured in one run on the same images at the coco config's 512x512 training resolution:
  1. on the fly (the official approach): read JPEG + panoptic PNG, decode ids, clean, remap,
     resize/pad, per sample;
  2. our Parquet reader (ShardDataset, training mode: random slot re-permutation included);
  3. preprocessing images/s with Ray Data (Ray overhead included, per CPU; worker start-up
     excluded by a warm-up run; the config's task sizes: two tasks per CPU on this input)
     vs a bare decode + resize loop over the same files in one process.

The two sides of each ratio are timed in alternation, as other processes may load the machine;
two processes running the bare loop at once show what the machine gives two CPUs at that time.

    OMP_NUM_THREADS=1 python benchmarks/loader_speed.py [--source FOLDER] [--repeat N]

(with ldmseg installed, e.g. ``pip install -e .``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]  # for the default data and config only: ldmseg is installed


def on_the_fly(records, cfg, rng) -> None:
    from ldmseg.data import coco
    from ldmseg.data.encoding import image_to_tensor
    from ldmseg.data.resize import resize_pad
    from ldmseg.data.slots import clean_segments, remap_ids

    for rec in records:
        s = coco.read_sample(rec)
        image, ids_r, valid, _ = resize_pad(s.image, s.id_map, cfg.data.resolution)
        clean = clean_segments(ids_r, s.segments_info, cfg.data.min_segment_area)
        remap_ids(clean.id_map, cfg.data.num_slots, rng)
        image_to_tensor(image)


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


def _bare_worker(args) -> float:
    source, resolution, repeat = args
    from ldmseg.data import coco

    records = coco.load_coco_panoptic(source).records
    bare_decode_resize(records[:2], resolution)
    t = time.perf_counter()
    for _ in range(repeat):
        bare_decode_resize(records, resolution)
    return len(records) * repeat / (time.perf_counter() - t)


def bare_two_processes(source: str, resolution: int, repeat: int) -> float:
    """images/s of the bare loop run in two processes at once: what this machine gives two
    CPU-bound processes at this moment (other processes may hold a core)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        return sum(pool.map(_bare_worker, [(source, resolution, repeat)] * 2))


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
    ap.add_argument("--source", default=str(REPO / "tests" / "data" / "coco" / "coco-val-examples"))
    ap.add_argument("--repeat", type=int, default=10, help="passes over the images for the reader timings")
    ap.add_argument("--copies", type=int, default=20, help="copies of each image for the preprocess timing")
    ap.add_argument("--rounds", type=int, default=3, help="timed preprocess runs (each after a bare loop)")
    args = ap.parse_args()

    from ldmseg.config import load_config
    from ldmseg.data import coco
    from ldmseg.data.parquet_dataset import ShardDataset
    from pipelines import ray_compat
    from pipelines.preprocess import run_preprocess, task_size

    cfg = load_config(REPO / "conf/coco.yaml")
    records = coco.load_coco_panoptic(args.source).records
    n = len(records)
    print(f"{n} images from {args.source}, training resolution {cfg.data.resolution}, "
          f"{args.repeat} passes, torch threads {os.environ.get('OMP_NUM_THREADS')}")

    cpus = os.cpu_count() or 1
    n_big = n * args.copies
    task_rows = task_size(n_big, cfg.preprocess.rows_per_file, cpus)
    rng = np.random.default_rng(0)
    # The two sides of each ratio are timed in alternation (pass after pass, run after run), so
    # that a load from other processes falls on both alike.
    with tempfile.TemporaryDirectory() as tmp:
        ray_compat.init_ray(num_cpus=cpus)
        out = Path(tmp) / "shards"
        big = replicate(Path(args.source), Path(tmp) / "big", args.copies)
        # warm-up on the timed input: starts every Ray worker process, imports, caches
        run_preprocess(cfg, output=str(out / "warmup"), source=str(big))
        bare_decode_resize(records[:2], cfg.data.resolution)

        bare_s = prep_s = 0.0
        for r in range(args.rounds):
            t = time.perf_counter()
            for _ in range(args.copies):  # as many images as one preprocess run
                bare_decode_resize(records, cfg.data.resolution)
            bare_s += time.perf_counter() - t
            t = time.perf_counter()
            run_preprocess(cfg, output=str(out / f"timed{r}"), source=str(big))
            prep_s += time.perf_counter() - t
        bare = n_big * args.rounds / bare_s
        prep = n_big * args.rounds / prep_s
        bare2 = bare_two_processes(args.source, cfg.data.resolution, max(1, args.repeat // 2))

        run_preprocess(cfg, output=str(out / "timed_small"), source=args.source)
        import ray

        ray.shutdown()  # the reader and the on-the-fly loop run without Ray (its processes stop)
        ds = ShardDataset(str(out / "timed_small"), "train", cfg.data.num_slots, train=True, repeat=True, seed=0)
        it = iter(ds)
        next(it)
        on_the_fly(records[:2], cfg, rng)  # warm-up
        fly_s = parquet_s = 0.0
        for _ in range(args.repeat):
            t = time.perf_counter()
            on_the_fly(records, cfg, rng)
            fly_s += time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(n):
                next(it)
            parquet_s += time.perf_counter() - t
        fly = n * args.repeat / fly_s
        parquet = n * args.repeat / parquet_s

    print(f"on the fly (COCO JSON+PNG+JPG, remap, resize) : {fly:8.1f} samples/s")
    print(f"Parquet reader (decode + re-permute)          : {parquet:8.1f} samples/s")
    print(f"  ratio reader / on the fly                   : {parquet / fly:8.1f}x   (target >= 10x)")
    print(f"bare decode + resize loop, 1 process          : {bare:8.1f} images/s")
    print(f"preprocess with Ray Data, {cpus} CPUs, tasks of {task_rows:3d} : {prep:8.1f} images/s "
          f"({n_big} images, {args.rounds} runs, {prep_s / args.rounds:.1f} s each)")
    print(f"  ratio preprocess per CPU / bare loop        : {prep / cpus / bare:8.2f}x  (target >= 0.7x)")
    print(f"bare loop in 2 processes at once              : {bare2:8.1f} images/s "
          f"({bare2 / bare:.2f}x one process: what this machine gave two processes)")
    print(f"  ratio preprocess / bare loop in 2 processes : {prep / bare2:8.2f}x")


if __name__ == "__main__":
    main()
