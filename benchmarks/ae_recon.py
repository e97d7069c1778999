"""Mask AE reconstruction PQ on COCO panoptic folders (e.g. the real samples in tests/data/coco).

    python benchmarks/ae_recon.py --model runs/bench/models/ae --data tests/data/coco/coco-panoptic-sample \
        --data tests/data/coco/coco-val-examples

Each folder's masks are resized to the model's training resolution, segments left under
``data.min_segment_area`` pixels there made void, and reconstructed by the AE
(:func:`ldmseg.training.monitor.ae_reconstruction_pq`); one line of PQ/SQ/RQ per folder and
``count_th``, and with several folders one more over all their images together. The default
scoring is the model config's own post-processing (its ``sampling.count_th``): the figure to
report. Other ``--count-th`` values are diagnostics (``min_segment_area / resolution²``, 0.0025
at 64² with 10 px, shows the AE without the area filter meant for sampling noise); a threshold
chosen on the images it is reported on makes no result.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch


class PerfectAE(torch.nn.Module):
    """Stands in for a mask AE: bit planes (B, nb, H, W) → ±20 logits (B, S, H, W) of the exact slots."""

    def __init__(self, num_slots: int) -> None:
        super().__init__()
        self.num_slots, self.num_bits = num_slots, num_slots.bit_length() - 1  # the scorer encodes with num_bits
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the scorer a device

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        from ldmseg.data.encoding import bits_to_ids

        ids = bits_to_ids(bits)
        return torch.nn.functional.one_hot(ids, self.num_slots).permute(0, 3, 1, 2).float() * 40 - 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder holding a mask_autoencoder")
    parser.add_argument("--data", action="append", required=True, help="COCO panoptic folder (repeatable)")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--count-th", type=float, action="append", default=None,
                        help="post-processing count_th to score with (repeatable; default: the model's "
                             "config). 0 keeps every decoded segment: the AE alone, without the area "
                             "filter meant for sampling noise")
    parser.add_argument("--perfect", action="store_true",
                        help="score a perfect AE instead (the slot map itself as logits): the ceiling "
                             "that slots, the area floor and count_th leave")
    parser.add_argument("--num-slots", type=int, default=None, help="with --perfect: slots to assume")
    parser.add_argument("--split-disconnected", action="store_true",
                        help="score with sampling.split_disconnected on (one segment per connected piece)")
    args = parser.parse_args()

    from ldmseg.checkpoint import load_model
    from ldmseg.config import override, with_sampling
    from ldmseg.data import coco
    from ldmseg.training.monitor import ae_reconstruction_pq

    loaded = load_model(args.model)
    ae = loaded.components["mask_autoencoder"]
    cfg = loaded.cfg
    if args.perfect:
        cfg = override(cfg, {"data.num_slots": args.num_slots or cfg.data.num_slots})
        ae = PerfectAE(cfg.data.num_slots)
    print(f"model {args.model}: resolution {cfg.data.resolution}, {cfg.data.num_slots} slots")
    datasets = {}
    for folder in args.data:
        d = coco.load_coco_panoptic(folder)
        datasets[folder] = dataclasses.replace(d, records=d.records[:args.max_images])
    if len(datasets) > 1:  # every image of every folder in one PQ (segments pooled, not folders averaged);
        # only the records are read, and each names its own files
        pooled = [r for x in datasets.values() for r in x.records]
        datasets["all folders"] = dataclasses.replace(datasets[args.data[0]], records=pooled)
    for count_th in args.count_th or [cfg.sampling.count_th]:
        scored = with_sampling(cfg, {"count_th": count_th, "split_disconnected": args.split_disconnected})
        for name, dataset in datasets.items():
            r = ae_reconstruction_pq(ae, dataset, scored)
            print(f"count_th {count_th:g}  {name}: PQ {100 * r['pq']:.1f}  SQ {100 * r['sq']:.1f}  "
                  f"RQ {100 * r['rq']:.1f}  ({r['n_images']} images, {r['n_segments']} segments, "
                  f"{r['n_over_slots']} beyond the slots)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
