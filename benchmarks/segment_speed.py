"""``ldmseg segment`` on Ray Data against a plain in-process loop, and its memory as the image count grows.

Speed: the same model (random weights of ``--config``: the cost of a trained one), the same
synthetic JPEGs, batch size and torch threads, the same step functions
(``pipelines.segment_steps``: read+decode+resize, model, write PNG/JSON part) on both sides:

  - plain: those three steps called one after the other in this process, batch by batch;
  - Ray:   ``segment()`` on a local Ray started beforehand (so Ray's own start-up is excluded;
           the model actor's start and model load are included, as the plain side's load is).

Memory: ``ldmseg segment`` run as a separate driver process (``--address`` of this benchmark's
Ray) on ``--memory-images`` copies of 64 small scenes under a tiny config (1 sampling step, so
10 000 images take minutes); /proc is sampled every 0.5 s for the driver's peak RSS and the
cluster's peak PSS (every Ray process this benchmark started: GCS, raylet, workers, object
store pages counted once). Bounded memory means the peaks do not grow with the image count.

    OMP_NUM_THREADS=1 python benchmarks/segment_speed.py [--images 512] [--memory-images 1000 10000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_model(folder: Path, config: str, overrides: list[str]) -> object:
    """A model folder of ``config`` with random weights (seeded); → its config."""
    import torch

    from ldmseg.checkpoint import build_components, save_model
    from ldmseg.config import load_config

    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    save_model(folder, cfg, build_components(cfg), latent_scale=1.0)
    return cfg


def make_images(folder: Path, count: int, size: tuple[int, int]) -> None:
    """``count`` JPEGs under ``folder``: 64 synthetic scenes (width × height ``size``) copied into
    sub-folders of 1 000 (hard links where the filesystem allows)."""
    from ldmseg.data.synthetic import write_scenes

    base = folder.parent / f"{folder.name}-base"
    if not base.exists():
        write_scenes(base, num_images=min(64, count), size=size[0], height=size[1], seed=0)
    sources = sorted((base / "images").glob("*.jpg"))
    for i in range(count):
        dst = folder / f"d{i // 1000:03d}" / f"{i:06d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(sources[i % len(sources)], dst)
        except OSError:
            shutil.copyfile(sources[i % len(sources)], dst)


def plain_loop(model: str, images: Path, out: Path, cfg, seed: int) -> float:
    """Seconds to segment every image of ``images`` with the steps of ``ldmseg segment`` in this process."""
    import numpy as np

    from ldmseg.config import to_dict
    from pipelines.segment_plan import plan
    from pipelines.segment_steps import SegmentModel, decode_step, write_step

    seg = cfg.segment
    t0 = time.perf_counter()
    todo = plan(str(images), str(out), overwrite=False).todo
    step = SegmentModel(model, to_dict(cfg.sampling), seed, 1)
    for start in range(0, len(todo), seg.batch_size):
        refs = todo[start:start + seg.batch_size]
        batch = {"uri": np.asarray([r.uri for r in refs], dtype=object),
                 "name": np.asarray([r.name for r in refs], dtype=object),
                 "image_id": np.asarray([r.image_id for r in refs], dtype=np.int64)}
        batch = step(decode_step(batch, cfg=cfg, max_pixels=seg.max_pixels, keep_bytes=False))
        write_step(batch, out=str(out), overlays=False, alpha=seg.overlay_alpha, quality=seg.overlay_quality,
                   max_pixels=seg.max_pixels)
    return time.perf_counter() - t0


# -- /proc sampling ----------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int, tree: dict[int, list[int]]) -> set[int]:
    found, stack = set(), [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _kib(pid: int, path: str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Peak RSS of the driver process and peak summed PSS of the Ray processes this process started."""

    def __init__(self, driver_pid: int):
        super().__init__(daemon=True)
        self.driver_pid, self.stop = driver_pid, threading.Event()
        self.driver_peak_kib = self.cluster_peak_kib = 0

    def run(self) -> None:
        while not self.stop.is_set():
            tree = _children()
            driver = {self.driver_pid} | _descendants(self.driver_pid, tree)
            cluster = _descendants(os.getpid(), tree) - driver
            self.driver_peak_kib = max(self.driver_peak_kib, _kib(self.driver_pid, "status", "VmRSS:"))
            self.cluster_peak_kib = max(self.cluster_peak_kib, sum(_kib(p, "smaps_rollup", "Pss:") for p in cluster))
            self.stop.wait(0.5)


def driver_memory(model: str, images: Path, out: Path, address: str, overrides: list[str]) -> dict:
    """Run ``ldmseg segment`` as its own driver process; → seconds, images/s and the memory peaks (MiB)."""
    import json

    cmd = [sys.executable, "-m", "pipelines.cli", "segment", "--model", model, "--input", str(images), "--output",
           str(out), "--address", address, "--no-mlflow", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"ldmseg segment failed with exit code {proc.returncode}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"seconds": time.time() - t0, "images_per_s": summary["images_per_s"], "segmented": summary["segmented"],
            "driver_mib": sampler.driver_peak_kib / 1024, "cluster_mib": sampler.cluster_peak_kib / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "conf" / "quickstart.yaml"),
                        help="model config of the speed comparison (default: %(default)s)")
    parser.add_argument("--images", type=int, default=512, help="images of the speed comparison (default: %(default)s)")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 72), metavar=("W", "H"),
                        help="synthetic image size, resized to the model's resolution (default: 96 72)")
    parser.add_argument("--memory-images", type=int, nargs="*", default=[1000, 10000],
                        help="image counts of the memory runs (default: 1000 10000; none to skip)")
    args = parser.parse_args()

    import ray

    from pipelines import ray_compat
    from pipelines.segment import segment

    with tempfile.TemporaryDirectory(prefix="ldmseg-bench-segment-") as tmp:
        tmp = Path(tmp)
        cfg = make_model(tmp / "model", args.config, [])
        make_images(tmp / "images", args.images, tuple(args.size))
        seg = cfg.segment
        print(f"[bench] plain loop: {args.images} images, batch {seg.batch_size}, {cfg.sampling.sampler} "
              f"{cfg.sampling.steps} steps", file=sys.stderr, flush=True)
        plain_s = plain_loop(str(tmp / "model"), tmp / "images", tmp / "plain", cfg, seed=0)
        ray_compat.init_ray(None)
        print("[bench] ldmseg segment on Ray Data", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        summary = segment(str(tmp / "model"), str(tmp / "images"), str(tmp / "ray"), seed=0, log_mlflow=False)
        ray_s = time.perf_counter() - t0
        assert summary["segmented"] == args.images, summary
        same = all((tmp / "plain" / "panoptic" / p.relative_to(tmp / "ray" / "panoptic")).read_bytes() == p.read_bytes()
                   for p in (tmp / "ray" / "panoptic").rglob("*.png"))

        memory = []
        if args.memory_images:
            tiny = str(REPO / "conf" / "tiny.yaml")
            make_model(tmp / "tiny", tiny, [])
            address = ray.get_runtime_context().gcs_address
            for count in args.memory_images:
                images = tmp / f"mem{count}"
                make_images(images, count, (48, 36))
                print(f"[bench] memory: {count} images, tiny config, 1 step", file=sys.stderr, flush=True)
                memory.append((count, driver_memory(str(tmp / "tiny"), images, tmp / f"out{count}", address,
                                                    ["sampling.steps=1"])))
                shutil.rmtree(images)
                shutil.rmtree(tmp / f"out{count}")

    plain_rate, ray_rate = args.images / plain_s, args.images / ray_s
    print(f"\nconfig {Path(args.config).name}, {args.images} images of {args.size[0]}x{args.size[1]}, batch "
          f"{seg.batch_size}, {cfg.sampling.sampler} {cfg.sampling.steps} steps, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {os.cpu_count()} CPUs")
    print(f"plain in-process loop:   {plain_rate:.3f} images/s ({plain_s:.1f} s)")
    print(f"ldmseg segment (Ray):    {ray_rate:.3f} images/s ({ray_s:.1f} s)")
    print(f"ratio Ray/plain:         {ray_rate / plain_rate:.2f}   (target >= 0.85)")
    print(f"identical panoptic PNGs on both sides: {same}")
    for count, m in memory:
        print(f"{count:>6} images (tiny, 1 step): {m['images_per_s']:.1f} images/s; driver peak RSS "
              f"{m['driver_mib']:.0f} MiB, cluster peak PSS {m['cluster_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
