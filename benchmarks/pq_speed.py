"""PQ evaluator throughput against the cost of just decoding the PNGs.

Writes N synthetic 640x480 ground-truth / prediction pairs (~20 segments each: stuff bands,
thing ellipses and polygons, a little void, the odd crowd; the prediction jitters, drops, splits
and adds segments under new ids) as two COCO panoptic folders, then measures in one run:

  (a)  the floor: decode both PNGs of every image to ids in one process (PIL open + rgb_to_id);
  (a') the evaluator's own decoder (read_id_map: RGBA bytes viewed as uint32) on the same files;
  (b)  evaluate_folders(..., workers=1), class-aware: images/s;
  (c)  evaluate_folders(..., workers=2);
  (d)  the machine's own 2-process scaling on a pure-Python loop, to read (c)/(b) against.

Prints images/s for each, (b)/(a) (target >= 0.9), (b)/(a') (what matching costs on top of the
fastest decode) and (c)/(b) (scaling). Each figure is the best of --repeat runs.

    OMP_NUM_THREADS=1 python benchmarks/pq_speed.py [--images 160] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def machine_scaling(repeat: int, n: int = 3_000_000) -> float:
    """Throughput of 2 processes over 1 on a pure-Python loop (2.0 = two full cores)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    one = min(_timed(lambda: spin(n)) for _ in range(repeat))
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(spin, [1000, 1000]))  # start the workers
        two = min(_timed(lambda: list(pool.map(spin, [n, n]))) for _ in range(repeat))
    return 2 * one / two


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_rate(fn, n: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160, help="synthetic image pairs (default 160)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the best counts (default 5)")
    args = parser.parse_args()

    from ldmseg.data.ids import rgb_to_id
    from ldmseg.metrics.pq import evaluate_folders
    from ldmseg.metrics.pq_io import read_id_map

    with tempfile.TemporaryDirectory(prefix="ldmseg-pq-speed-") as tmp:
        t0 = time.perf_counter()
        gt, pred = write_pairs(Path(tmp), args.images)
        segs = [len(a["segments_info"]) for a in json.loads((gt / "panoptic.json").read_text())["annotations"]]
        print(f"wrote {args.images} pairs of {W}x{H} PNGs ({np.mean(segs):.1f} GT segments per image on average) "
              f"in {time.perf_counter() - t0:.1f} s")
        pngs = sorted((gt / "panoptic").glob("*.png"))
        pairs = [(p, pred / "panoptic" / p.name) for p in pngs]

        def floor() -> None:
            for g, p in pairs:
                for path in (g, p):
                    with Image.open(path) as im:
                        rgb_to_id(np.asarray(im))

        def fast_decode() -> None:
            for g, p in pairs:
                read_id_map(g)
                read_id_map(p)

        floor()  # warm the page cache
        n = len(pairs)
        a = best_rate(floor, n, args.repeat)
        a_fast = best_rate(fast_decode, n, args.repeat)
        result = evaluate_folders(gt, pred, workers=1)
        b = best_rate(lambda: evaluate_folders(gt, pred, workers=1), n, args.repeat)
        c = best_rate(lambda: evaluate_folders(gt, pred, workers=2), n, args.repeat)
    d = machine_scaling(args.repeat)

    print(f"result (class-aware): PQ {result['All']['pq']:.4f}  TP {result['All']['tp']}  "
          f"FP {result['All']['fp']}  FN {result['All']['fn']}  ({result['n_images']} images)")
    print(f"(a)  floor, PIL open + rgb_to_id, both PNGs, 1 process : {a:7.1f} images/s")
    print(f"(a') read_id_map (RGBA view), both PNGs, 1 process      : {a_fast:7.1f} images/s")
    print(f"(b)  evaluate_folders workers=1                         : {b:7.1f} images/s")
    print(f"(c)  evaluate_folders workers=2                         : {c:7.1f} images/s")
    print(f"(b)/(a)  = {b / a:.2f}  (target >= 0.9)")
    print(f"(b)/(a') = {b / a_fast:.2f}  (matching on top of the fastest decode)")
    print(f"(c)/(b)  = {c / b:.2f}  (scaling to 2 workers; pool start-up included)")
    print(f"(d)      = {d:.2f}  (this machine: 2 processes vs 1 on a pure-Python loop)")


if __name__ == "__main__":
    main()
