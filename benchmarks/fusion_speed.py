"""What making one map of K samples costs beside the sampling: the medoid against the vote.

K synthetic id maps of H x W (each a Voronoi partition of S random seeds, so the samples disagree
everywhere: the vote's worst case, most groups), timed with :func:`ldmseg.agreement.choose_medoid`
and :func:`ldmseg.agreement.consensus_map`; prints seconds of each and their ratio.

    python benchmarks/fusion_speed.py --size 480x640 --samples 16 --segments 15
"""

from __future__ import annotations

import argparse
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="480x640", help="HxW of the maps (default %(default)s)")
    parser.add_argument("--samples", type=int, default=16, help="K (default %(default)s)")
    parser.add_argument("--segments", type=int, default=15, help="segments per map (default %(default)s)")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))

    import numpy as np

    from ldmseg.agreement import choose_medoid, consensus_map

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    maps = []
    for _ in range(args.samples):
        seeds = rng.integers(0, [h, w], size=(args.segments, 2))
        dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
        maps.append(dist.argmin(-1) + 1)
    t = time.perf_counter()
    choose_medoid(maps)
    medoid = time.perf_counter() - t
    t = time.perf_counter()
    consensus_map(maps)
    vote = time.perf_counter() - t
    print(f"{args.samples} maps of {h}x{w}, {args.segments} segments each: medoid {medoid:.2f} s, vote {vote:.2f} s, "
          f"vote / medoid {vote / medoid:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
