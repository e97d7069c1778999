"""PQ evaluation speed: ``ldmseg pq`` (``evaluate_folders``) next to hotcoco's ``pq_compute``, one thread each.

Writes N synthetic 640x480 ground-truth / prediction pairs (~20 segments each: stuff bands,
thing ellipses and polygons, a little void, the odd crowd; the prediction jitters, drops, splits
and adds segments under new ids) as two COCO panoptic folders, then measures in one run, the
timed calls in alternation:

  (a) ``evaluate_folders(gt, pred, workers=1)``: what ``ldmseg pq`` runs (engine "hotcoco");
  (b) ``hotcoco.panoptic.pq_compute`` on the same folders (the peer, hotcoco as is);
  (c) ``evaluate_folders(..., engine="numpy", workers=1)``: the project's own NumPy matcher.

hotcoco runs on Rayon's thread pool, sized by ``RAYON_NUM_THREADS`` when hotcoco first runs in a
process: this script sets it to 1 before importing hotcoco (both (a) and (b) use it). Prints for
each images per second of wall time and per CPU second of this process (the same on an idle core;
on a shared machine the CPU figure is the steadier one), (a)/(b) (target >= 1.0) and (c)/(b), and
asserts that (a), (b) and (c) give the same PQ, SQ, RQ (to the 10 printed digits) and counts.
Each figure is the best of --repeat runs.

    (hotcoco, the peer, is installed with the project: it is the engine behind ldmseg pq)
    OMP_NUM_THREADS=1 python benchmarks/pq_speed.py [--images 160] [--repeat 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

W, H = 640, 480
THINGS, STUFF = list(range(1, 11)), list(range(11, 16))


def colour(sid: int) -> tuple[int, int, int]:
    return (sid & 255, (sid >> 8) & 255, (sid >> 16) & 255)


def draw_scene(shapes: list[dict], void: list) -> np.ndarray:
    """Paint shapes in order (later on top) into an RGB panoptic PNG array (H, W, 3) uint8."""
    img = Image.new("RGB", (W, H))
    draw = ImageDraw.Draw(img)
    for s in shapes:
        if s["kind"] == "band":
            draw.rectangle([0, s["y0"], W, s["y1"]], fill=colour(s["id"]))
        elif s["kind"] == "ellipse":
            draw.ellipse(s["box"], fill=colour(s["id"]))
        else:
            draw.polygon(s["points"], fill=colour(s["id"]))
    for box in void:
        draw.rectangle(box, fill=(0, 0, 0))
    return np.asarray(img)


def segments_info(rgb: np.ndarray, shapes: list[dict]) -> list[dict]:
    ids = rgb[..., 0].astype(np.int64) | (rgb[..., 1].astype(np.int64) << 8) | (rgb[..., 2].astype(np.int64) << 16)
    present, counts = np.unique(ids, return_counts=True)
    area = dict(zip(present.tolist(), counts.tolist()))
    info = {}
    for s in shapes:  # last wins: the painted order
        if area.get(s["id"]):
            info[s["id"]] = {"id": s["id"], "category_id": s["cat"], "iscrowd": s.get("crowd", 0),
                             "area": area[s["id"]]}
    return list(info.values())


def scene(rng: np.random.Generator, next_id) -> tuple[list[dict], list]:
    shapes, cuts = [], np.sort(rng.integers(60, H - 60, 3))
    bounds = [0, *cuts.tolist(), H]
    for y0, y1 in zip(bounds[:-1], bounds[1:]):
        shapes.append({"kind": "band", "id": next_id(), "cat": int(rng.choice(STUFF)), "y0": y0, "y1": y1})
    for _ in range(16):
        cx, cy, r = rng.integers(0, W), rng.integers(0, H), rng.integers(12, 80)
        cat = int(rng.choice(THINGS))
        if rng.random() < 0.5:
            shapes.append({"kind": "ellipse", "id": next_id(), "cat": cat,
                           "box": [int(cx - r), int(cy - r * 0.7), int(cx + r), int(cy + r * 0.7)]})
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 6))
            pts = [(int(cx + r * np.cos(a)), int(cy + r * np.sin(a))) for a in angles]
            shapes.append({"kind": "polygon", "id": next_id(), "cat": cat, "points": pts})
    if rng.random() < 0.3:
        shapes[-1]["crowd"] = 1
    void = [[int(x), int(y), int(x + rng.integers(10, 60)), int(y + rng.integers(10, 40))]
            for x, y in zip(rng.integers(0, W, 3), rng.integers(0, H, 3))]
    return shapes, void


def perturb(rng: np.random.Generator, shapes: list[dict], next_id) -> list[dict]:
    """A plausible prediction: jittered shapes under new ids, some dropped, one split, some added."""
    out = []
    for s in shapes:
        if s["kind"] != "band" and rng.random() < 0.1:
            continue  # dropped -> FN
        d = {**s, "id": next_id(), "crowd": 0}
        dx, dy = rng.integers(-6, 7, 2)
        if s["kind"] == "band":
            d["y1"] = max(s["y0"], int(s["y1"] + dy))
        elif s["kind"] == "ellipse":
            d["box"] = [int(v + o) for v, o in zip(s["box"], (dx, dy, dx, dy))]
        else:
            d["points"] = [(int(x + dx), int(y + dy)) for x, y in s["points"]]
        out.append(d)
    band = out[0]  # split the first stuff band in two
    out.insert(1, {"kind": "polygon", "id": next_id(), "cat": band["cat"],
                   "points": [(0, band["y0"]), (W // 3, band["y0"]), (W // 3, band["y1"]), (0, band["y1"])]})
    for _ in range(2):  # spurious things -> FP
        cx, cy = rng.integers(0, W), rng.integers(0, H)
        out.append({"kind": "ellipse", "id": next_id(), "cat": int(rng.choice(THINGS)),
                    "box": [int(cx - 20), int(cy - 15), int(cx + 20), int(cy + 15)]})
    return out


def write_pairs(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    ids = iter(rng.choice(np.arange(1, 2**24), size=100 * n, replace=False).tolist())

    def next_id() -> int:
        return int(next(ids))

    gt, pred = root / "gt", root / "pred"
    for folder in (gt, pred):
        (folder / "panoptic").mkdir(parents=True)
    gt_anns, pred_anns, images = [], [], []
    for i in range(n):
        shapes, void = scene(rng, next_id)
        pshapes = perturb(rng, shapes, next_id)
        name = f"{i:012d}.png"
        g_rgb, p_rgb = draw_scene(shapes, void), draw_scene(pshapes, [])
        Image.fromarray(g_rgb).save(gt / "panoptic" / name)
        Image.fromarray(p_rgb).save(pred / "panoptic" / name)
        gt_anns.append({"image_id": i, "file_name": name, "segments_info": segments_info(g_rgb, shapes)})
        pred_anns.append({"image_id": i, "file_name": name, "segments_info": segments_info(p_rgb, pshapes)})
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "height": H, "width": W})
    categories = [{"id": c, "name": f"thing{c}", "isthing": 1} for c in THINGS] + \
                 [{"id": c, "name": f"stuff{c}", "isthing": 0} for c in STUFF]
    (gt / "panoptic.json").write_text(json.dumps({"images": images, "annotations": gt_anns,
                                                  "categories": categories}))
    (pred / "panoptic.json").write_text(json.dumps({"images": images, "annotations": pred_anns}))
    return gt, pred


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def printed(groups: dict) -> list[str]:
    """The compared figures: PQ, SQ, RQ to 10 digits and n, per group."""
    return [f"{name} pq={groups[name]['pq']:.10f} sq={groups[name]['sq']:.10f} rq={groups[name]['rq']:.10f} "
            f"n={int(groups[name]['n'])}" for name in ("All", "Things", "Stuff")]


def time_shipped(gt: Path, pred: Path, repeat: int) -> dict:
    """(d) ``ldmseg pq`` as shipped: ``evaluate_folders`` with its defaults (hotcoco on one thread per
    core), timed in a child process whose environment has no ``RAYON_NUM_THREADS``."""
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
    out = subprocess.run([sys.executable, __file__, "--time-shipped", str(gt), str(pred), "--repeat", str(repeat)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _child_time_shipped(gt: str, pred: str, repeat: int) -> None:
    from ldmseg.metrics.pq import evaluate_folders

    result = evaluate_folders(gt, pred)  # warm-up, also the figures compared
    times = [timed(lambda: evaluate_folders(gt, pred)) for _ in range(repeat)]
    print(json.dumps({"result": result, "wall": min(w for w, _ in times), "cpu": min(c for _, c in times),
                      "threads": os.cpu_count()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160, help="synthetic image pairs (default 160)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the best counts (default 5)")
    parser.add_argument("--time-shipped", nargs=2, metavar=("GT", "PRED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_shipped:
        return _child_time_shipped(*args.time_shipped, args.repeat)

    os.environ["RAYON_NUM_THREADS"] = "1"  # read by hotcoco's Rayon pool when hotcoco first runs here
    from hotcoco.panoptic import pq_compute

    from ldmseg.metrics.pq import evaluate_folders

    with tempfile.TemporaryDirectory(prefix="ldmseg-pq-speed-") as tmp:
        t0 = time.perf_counter()
        gt, pred = write_pairs(Path(tmp), args.images)
        segs = [len(a["segments_info"]) for a in json.loads((gt / "panoptic.json").read_text())["annotations"]]
        print(f"wrote {args.images} pairs of {W}x{H} PNGs ({np.mean(segs):.1f} GT segments per image on average) "
              f"in {time.perf_counter() - t0:.1f} s")

        def hotcoco() -> dict:
            with contextlib.redirect_stdout(io.StringIO()):  # pq_compute prints its table
                return pq_compute(gt / "panoptic.json", pred / "panoptic.json", gt / "panoptic", pred / "panoptic")

        runs = {"a": lambda: evaluate_folders(gt, pred, workers=1),
                "b": hotcoco,
                "c": lambda: evaluate_folders(gt, pred, engine="numpy", workers=1)}
        results = {k: fn() for k, fn in runs.items()}  # also warms the page cache and the imports
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        for _ in range(args.repeat):
            for k, fn in runs.items():
                times[k].append(timed(fn))
        shipped = time_shipped(gt, pred, args.repeat)

    reference = printed(results["b"])
    results["d"] = shipped["result"]
    for k in ("a", "c", "d"):
        assert printed(results[k]) == reference, (k, printed(results[k]), reference)
    per_class = {int(c): (r["tp"], r["fp"], r["fn"]) for c, r in results["b"]["per_class"].items()}
    assert (results["a"]["All"]["tp"], results["a"]["All"]["fp"], results["a"]["All"]["fn"]) == \
        tuple(sum(v[i] for v in per_class.values()) for i in range(3))

    n = args.images
    wall = {k: n / min(w for w, _ in v) for k, v in times.items()}
    cpu = {k: n / min(c for _, c in v) for k, v in times.items()}
    wall["d"], cpu["d"] = n / shipped["wall"], n / shipped["cpu"]
    print("results (class-aware), identical for (a), (b), (c) and (d):")
    for line in reference:
        print("   ", line)
    print(f"    TP {results['a']['All']['tp']}  FP {results['a']['All']['fp']}  FN {results['a']['All']['fn']}  "
          f"({results['a']['n_images']} images)")
    labels = {"a": "(a) ldmseg pq: evaluate_folders workers=1 (hotcoco engine)",
              "b": "(b) hotcoco pq_compute, RAYON_NUM_THREADS=1",
              "c": "(c) evaluate_folders engine='numpy' workers=1",
              "d": f"(d) ldmseg pq as shipped (hotcoco, {shipped['threads']} threads)"}
    print(f"{'':60s}  {'images/s':>9}  {'per CPU-s':>9}")
    for k, label in labels.items():
        print(f"{label:60s}: {wall[k]:9.1f}  {cpu[k]:9.1f}")
    print(f"(a)/(b) = {wall['a'] / wall['b']:.2f} wall, {cpu['a'] / cpu['b']:.2f} CPU  (target >= 1.0)")
    print(f"(c)/(b) = {wall['c'] / wall['b']:.2f} wall, {cpu['c'] / cpu['b']:.2f} CPU")
    print(f"(d)/(b) = {wall['d'] / wall['b']:.2f} wall  (ldmseg pq as shipped against hotcoco on one thread)")


if __name__ == "__main__":
    main()
