"""The three data roles of synthetic scenes, and the seeds that keep them apart.

- **training** scenes: ``synth.seed`` (with ``preprocess.val_fraction`` of them held out of
  training as the ``val`` split that the in-training validation PQ reads);
- **validation** scenes: ``synth.seed + VALIDATION_SEED_OFFSET``; every choice (sampler, steps,
  thresholds, channels, budgets) is made on these, e.g. with ``ldmseg tune sampling``;
- **test** scenes: ``synth.seed + TEST_SEED_OFFSET``; made once, scored once per run, never used
  to choose anything. The quickstart and the bench report their PQ on these.

Scene ``i`` depends only on ``(seed, i)``, so the three sets never share a scene. The seed
``synth.seed + 1_000_003`` ("held-out" scenes before 2026-12-04) informed the bench's sampler
choice and is retired as a test seed.
"""

from __future__ import annotations

import dataclasses

from ldmseg.config import SynthConfig

VALIDATION_SEED_OFFSET = 2_000_003
TEST_SEED_OFFSET = 9_000_011
RETIRED_SEED_OFFSETS = (1_000_003,)


def role_synth_config(synth: SynthConfig, role: str, num_images: int | None = None) -> SynthConfig:
    """``synth`` with the seed (and optionally the count) of ``role``: train | validation | test."""
    offsets = {"train": 0, "validation": VALIDATION_SEED_OFFSET, "test": TEST_SEED_OFFSET}
    if role not in offsets:
        raise ValueError(f"role must be one of {', '.join(offsets)}, got {role!r}")
    return dataclasses.replace(synth, seed=synth.seed + offsets[role],
                               num_images=synth.num_images if num_images is None else num_images)


def synth_command(cfg: SynthConfig, out: str) -> str:
    """The ``ldmseg synth`` command line that writes exactly these scenes (for docs and summaries)."""
    words = ["ldmseg", "synth", out, "--num-images", str(cfg.num_images), "--size", str(cfg.size)]
    if cfg.height is not None:
        words += ["--height", str(cfg.height)]
    words += ["--seed", str(cfg.seed), "--min-things", str(cfg.min_things), "--max-things", str(cfg.max_things),
              "--max-stuff", str(cfg.max_stuff), "--void-fraction", str(cfg.void_fraction),
              "--crowd-prob", str(cfg.crowd_prob), "--shared-colour-prob", str(cfg.shared_colour_prob)]
    return " ".join(words)
