"""Write procedural COCO-like maps as a COCO panoptic folder: a validation set for mask AE choices.

The real COCO samples in tests/data/coco are what the bench's AE target is scored on, so they may
not choose anything. The AE's COCO-like training maps (:func:`ldmseg.data.random_maps.random_slot_maps`)
drawn with a seed of their own stand in for them when a choice is made:

    python benchmarks/random_map_set.py runs/val/random_maps --num-images 256 --seed 3000017
    python benchmarks/ae_recon.py --model runs/bench/models/ae --data runs/val/random_maps

Each map is one image (a flat grey picture; the AE reads only the masks), every segment one
``thing`` category, its id the slot itself (slot 0, void, is id 0). An existing set is never
overwritten: a seed names one set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, in one line, or None."""
    if args.num_images < 1:
        return f"--num-images must be at least 1, got {args.num_images}"
    if args.size < 8:
        return f"--size must be at least 8 pixels, got {args.size}"
    if args.num_slots < 2 or args.num_slots & (args.num_slots - 1):
        return f"--num-slots must be a power of two >= 2 (data.num_slots), got {args.num_slots}"
    if args.min_area < 0:
        return f"--min-area must be >= 0, got {args.min_area}"
    if (Path(args.output) / "panoptic.json").exists():
        return f"{args.output} already holds a set (panoptic.json): pick another folder, or delete it first"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the folder to write (COCO panoptic layout)")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--size", type=int, default=64, help="H = W of the maps (the bench's data.resolution)")
    parser.add_argument("--num-slots", type=int, default=32, help="segments per map at most + 1 (data.num_slots)")
    parser.add_argument("--min-area", type=int, default=10, help="data.min_segment_area")
    parser.add_argument("--seed", type=int, required=True, help="the set's seed (never a training seed)")
    args = parser.parse_args()
    problem = check_args(args)
    if problem:
        print(f"random_map_set.py: {problem}", file=sys.stderr)
        return 2

    import torch

    from ldmseg.data.coco_writer import CocoPanopticWriter
    from ldmseg.data.random_maps import random_slot_maps
    from ldmseg.data.segments import segments_info

    generator = torch.Generator().manual_seed(args.seed)
    maps = random_slot_maps(args.num_images, args.size, args.num_slots, min_area=args.min_area,
                            generator=generator).numpy()
    grey = np.full((args.size, args.size, 3), 128, np.uint8)
    categories = [{"id": 1, "name": "thing", "supercategory": "thing", "isthing": 1}]
    with CocoPanopticWriter(args.output, categories, images=True) as writer:
        for index, slot_map in enumerate(maps, start=1):
            id_map = slot_map.astype(np.int64)
            writer.add_image(index, f"{index:012d}.png", args.size, args.size, image=grey)
            writer.add_annotation(index, f"{index:012d}.png", id_map, segments_info(id_map))
    segments = sum(len(np.unique(m)) - (0 in m) for m in maps)
    print(f"wrote {args.num_images} maps ({segments} segments), seed {args.seed}, to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
