"""A model folder with a Ray Train checkpoint's raw (non-EMA) denoiser weights, to score them
against the EMA weights that the stage saves:

    python benchmarks/raw_weights.py --model runs/bench/models/ldm \
        --checkpoint runs/bench/ray_results/ldm-<hash>/checkpoint_<time>/trainer_state.pt --output runs/bench/models/ldm-raw
    ldmseg evaluate --model runs/bench/models/ldm-raw --data runs/bench/scenes/tune
"""

from __future__ import annotations

import argparse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the stage's model folder (EMA weights)")
    parser.add_argument("--checkpoint", required=True, help="trainer_state.pt of the same run's last checkpoint")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    import torch

    from ldmseg.checkpoint import load_model, save_model

    loaded = load_model(args.model)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)["model"]
    loaded.components["denoiser"].load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    save_model(args.output, loaded.cfg, loaded.components, latent_scale=loaded.latent_scale)
    print(f"raw weights of {args.checkpoint} saved as {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
