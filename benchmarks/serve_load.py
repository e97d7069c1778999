"""``ldmseg serve`` under closed-loop HTTP load: latency, throughput and batching, against an in-process loop.

The same model (random weights of ``--config``: the cost of a trained one), ``--steps`` sampling
steps, different synthetic 64x48 PNG scenes per request, on a local Ray started beforehand (Ray's
and Serve's start-up and the replica's model load are excluded), loopback HTTP only:

  1. batched:   ``serve.max_batch_size=8`` (``max_ongoing_requests`` 16); closed-loop load from
                1, 4 and 16 client threads (each its own keep-alive ``http.client`` connection, the
                next request as soon as the previous answer arrives), warm-up requests first; per
                level: answers, errors (any non-200: printed), p50/p95/p99 latency, requests/s,
                mean ``batch_size`` of the answers (requests the replica sampled together), and
                where the time goes (the share of the wall time the replica spent sampling, and its
                sampling rate against the in-process one);
  2. unbatched: the app redeployed on the same port with ``serve.max_batch_size=1``; concurrency
                16 only; batched/unbatched throughput at 16 (target >= 2x);
  3. in-process: :class:`~ldmseg.segmenter.Segmenter` on the images of the concurrency-16 level, in
                batches of 8, same steps and seeds, 1 torch thread (the replica's ``num_cpus``), the median
                of three passes; the
                served throughput at 16 over it (target >= 0.8x). Serve and Ray are shut down first.
                Its timing includes ``prepare`` (resize) but not PNG decoding, as the replica does.

Each level stops at ``--requests`` answers or when the ``--time-cap`` (whole run) is reached.

    OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true RAY_AUTH_MODE=disabled \\
        python benchmarks/serve_load.py [--requests 128] [--steps 10] [--time-cap 1200]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segment_speed import REPO, make_model  # noqa: E402

SIZE = (64, 48)  # width, height of the request images
BATCH = 8


def scene(seed: int, w: int = SIZE[0], h: int = SIZE[1]) -> np.ndarray:
    """(h, w, 3) uint8: flat rectangles of random colours on a background, different per seed."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), rng.integers(0, 255, 3), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        dy, dx = int(rng.integers(6, h // 2 + 1)), int(rng.integers(6, w // 2 + 1))
        image[y:y + dy, x:x + dx] = rng.integers(0, 255, 3)
    return image


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def load(url: str, bodies: list[bytes], seeds: list[int], concurrency: int, params: dict, deadline: float,
         label: str) -> dict:
    """Closed loop: ``concurrency`` threads post ``bodies`` (each once, in order) until all are
    answered or ``deadline`` (time.time()) passes; → figures of the answered ones."""
    import http.client
    import json
    from urllib.parse import urlencode, urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    lock = threading.Lock()
    todo = iter(range(len(bodies)))
    latencies: list[float] = []
    batch_sizes: list[int] = []
    model_s: list[float] = []  # each answer's share of its batch's sampling time on the replica
    errors: list[str] = []

    def worker() -> None:
        # the standard library's HTTP client, one keep-alive connection per thread: the load generator
        # shares the server's two cores here, so it should cost them as little as it can
        conn = http.client.HTTPConnection(host, port, timeout=300)
        while time.time() < deadline:
            with lock:
                i = next(todo, None)
            if i is None:
                break
            path = f"/v1/segment?{urlencode({**params, 'seed': seeds[i]})}"
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=bodies[i], headers={"Content-Type": "image/png"})
                r = conn.getresponse()
                data = r.read()
                ms = 1000 * (time.perf_counter() - t0)
                if r.status != 200:
                    problem = f"HTTP {r.status} {r.getheader('retry-after', '')} {data[:200]!r}"
                else:
                    body, problem = json.loads(data), None
            except Exception as exc:  # noqa: BLE001 - a refused or dropped connection is an error too
                problem, ms = f"{type(exc).__name__}: {exc}", None
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=300)
            with lock:
                if problem is not None:
                    errors.append(f"request {i}: {problem}")
                else:
                    latencies.append(ms)
                    batch_sizes.append(int(body["batch_size"]))
                    model_s.append(body["timings_ms"]["model"] / 1000 / int(body["batch_size"]))
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for e in errors:
        print(f"[bench] {label} ERROR {e}", file=sys.stderr, flush=True)
    counts = {b: batch_sizes.count(b) for b in sorted(set(batch_sizes))}
    return {"label": label, "concurrency": concurrency, "count": len(latencies), "errors": len(errors),
            "wall_s": wall, "p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99), "rps": len(latencies) / wall if wall > 0 else float("nan"),
            "mean_batch": float(np.mean(batch_sizes)) if batch_sizes else float("nan"), "batch_counts": counts,
            # the replica's sampling: its share of the wall time, and its own rate while sampling
            "model_busy": sum(model_s) / wall if wall > 0 else float("nan"),
            "model_rate": len(model_s) / sum(model_s) if model_s else float("nan"),
            "cut": len(latencies) + len(errors) < len(bodies)}


def deploy(model: str, port: int, overrides: list[str], first: bool) -> dict:
    """(Re)deploy the ``ldmseg serve`` app on ``port`` with ``overrides``; returns when ready."""
    from ray import serve

    from pipelines.serve import APP_NAME, build_app

    if first:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    else:
        serve.delete(APP_NAME)  # the old replica frees its CPU before the new one starts
    app, info = build_app(model, overrides=overrides)
    t0 = time.time()
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"[bench] deployed {' '.join(overrides)} in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    return info


def in_process(model: str, images: list[np.ndarray], seeds: list[int], steps: int, sampler: str | None) -> float:
    """images/s of the Segmenter on ``images`` in batches of ``BATCH`` with 1 torch thread (after one
    warm-up batch; the median of three passes)."""
    import torch

    from ldmseg.segmenter import Segmenter

    torch.set_num_threads(1)
    seg = Segmenter.from_pretrained(model)
    sampling = seg.sampling_config(sampler, steps)

    def run(imgs: list[np.ndarray], sds: list[int]) -> None:
        for start in range(0, len(imgs), BATCH):
            prepared = [seg.prepare(im) for im in imgs[start:start + BATCH]]
            seg.segment_prepared([p[0] for p in prepared], [p[1] for p in prepared], seeds=sds[start:start + BATCH],
                                 sampling=sampling, num_samples=1)

    run(images[:BATCH], seeds[:BATCH])  # warm-up
    rates = []
    for _ in range(3):  # the median of three passes: one pass lasts only a few seconds
        t0 = time.perf_counter()
        run(images, seeds)
        rates.append(len(images) / (time.perf_counter() - t0))
    return float(np.median(rates))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "conf" / "quickstart.yaml"),
                        help="model config (random weights; default: %(default)s)")
    parser.add_argument("--requests", type=int, default=128, help="requests per load level (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16],
                        help="client threads of the batched levels (default: 1 4 16); the last is the one "
                             "compared with unbatched and in-process")
    parser.add_argument("--warmup", type=int, default=16,
                        help="warm-up requests before each deployment's levels, sent at the highest concurrency "
                             "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps, served (sampling.steps) and asked "
                                                              "(default: %(default)s)")
    parser.add_argument("--sampler", default=None, help="sampler (default: the config's)")
    parser.add_argument("--time-cap", type=float, default=1200.0,
                        help="seconds for the whole run; levels stop early beyond it (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="more serve.* overrides for both deployments, e.g. serve.batch_wait_timeout_s=0.05")
    args = parser.parse_args()
    t_start = time.time()
    deadline = t_start + args.time_cap

    from ray import serve

    from pipelines import ray_compat

    top = max(args.concurrency)
    params = {"steps": args.steps, **({"sampler": args.sampler} if args.sampler else {})}
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ldmseg-bench-serve-") as tmp:
        model = str(Path(tmp) / "model")
        cfg = make_model(Path(model), args.config, [])
        sampler = args.sampler or cfg.sampling.sampler
        # every request its own scene: warm-up seeds 1 000 000+, level k seeds k*100 000+
        level_seeds = {k: [k * 100_000 + i for i in range(args.requests)] for k in range(len(args.concurrency) + 1)}
        warm_seeds = [1_000_000 + i for i in range(args.warmup)]
        images = {s: scene(s) for seeds in [*level_seeds.values(), warm_seeds] for s in seeds}
        bodies = {s: png(im) for s, im in images.items()}

        ray_compat.init_ray(None)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        try:
            common = [f"sampling.steps={args.steps}", "serve.max_ongoing_requests=16", *args.overrides]
            phases = [("batched", [*common, f"serve.max_batch_size={BATCH}"], args.concurrency),
                      ("unbatched", [*common, "serve.max_batch_size=1"], [top])]
            level = 0
            for p, (name, overrides, levels) in enumerate(phases):
                deploy(model, port, overrides, first=p == 0)
                warm = load(url, [bodies[s] for s in warm_seeds], warm_seeds, min(top, args.warmup), params,
                            deadline, f"{name} warm-up")
                if warm["errors"]:
                    print(f"[bench] {name} warm-up: {warm['errors']} errors", file=sys.stderr, flush=True)
                for c in levels:
                    seeds = level_seeds[level]
                    level += 1
                    print(f"[bench] {name}: concurrency {c}, {len(seeds)} requests", file=sys.stderr, flush=True)
                    r = load(url, [bodies[s] for s in seeds], seeds, c, params, deadline, f"{name} c={c}")
                    r["seeds"] = seeds
                    results.append(r)
                    print(f"[bench]   {r['count']} answers, {r['errors']} errors, {r['rps']:.2f} req/s, batch "
                          f"sizes {r['batch_counts']}", file=sys.stderr, flush=True)
        finally:
            serve.shutdown()
            import ray

            ray.shutdown()

        batched_top = next(r for r in results if r["label"] == f"batched c={top}")
        unbatched_top = next(r for r in results if r["label"].startswith("unbatched"))
        seeds = batched_top["seeds"][:max(BATCH, batched_top["count"])]
        print(f"[bench] in-process: {len(seeds)} images, batches of {BATCH}", file=sys.stderr, flush=True)
        local_rate = in_process(model, [images[s] for s in seeds], seeds, args.steps, args.sampler)

    errors = sum(r["errors"] for r in results)
    print(f"\nconfig {Path(args.config).name} (random weights), {sampler} {args.steps} steps, {SIZE[0]}x{SIZE[1]} "
          f"PNGs, {args.requests} requests per level (+{args.warmup} warm-up per deployment), loopback HTTP; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {os.cpu_count()} CPUs, "
          f"{time.time() - t_start:.0f} s in all")
    print(f"{'deployment':<22}{'conc':>5}{'answers':>9}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
          f"{'req/s':>8}{'batch':>7}  batch sizes seen")
    for r in results:
        deployment = ("max_batch_size=8" if r["label"].startswith("batched") else "max_batch_size=1")
        cut = " (cut by --time-cap)" if r["cut"] else ""
        print(f"{deployment:<22}{r['concurrency']:>5}{r['count']:>9}{r['errors']:>8}{r['p50']:>9.0f}{r['p95']:>9.0f}"
              f"{r['p99']:>9.0f}{r['rps']:>8.2f}{r['mean_batch']:>7.2f}  {r['batch_counts']}{cut}")
    print(f"{'in-process, batch 8':<22}{'':>5}{len(seeds):>9}{'':>8}{'':>9}{'':>9}{'':>9}{local_rate:>8.2f}"
          f"{BATCH:>7.2f}  (images/s, 1 torch thread)")
    ratio_unbatched = batched_top["rps"] / unbatched_top["rps"]
    ratio_local = batched_top["rps"] / local_rate
    print(f"batched / unbatched throughput at concurrency {top}:  {ratio_unbatched:.2f}x   (target >= 2x)")
    print(f"served at concurrency {top} / in-process batch {BATCH}:   {ratio_local:.2f}x   (target >= 0.8x)")
    print(f"  where it goes: the replica sampled {batched_top['model_busy']:.0%} of the wall time, at "
          f"{batched_top['model_rate']:.2f} images/s while sampling ({batched_top['model_rate'] / local_rate:.2f}x "
          f"the in-process rate)")
    print(f"errors (non-200 or no answer): {errors}   (target 0)")
    print("command (from the repository root): OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true "
          f"RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/serve_load.py {' '.join(sys.argv[1:])}".rstrip())
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
